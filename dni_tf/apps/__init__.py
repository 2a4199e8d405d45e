"""The command-line programs: `dni-tf SUBCOMMAND --workdir=DIR [flags]`.

One module per study (its absl flags and `main`); `dni_tf.apps.__main__` is the
`dni-tf` dispatcher and imports only the chosen module, since absl flags are
global to the process. From a checkout `python -m experiments.NAME` runs the
same module.

Each program imports `dni_tf.apps.quiet_tensorflow` first: TensorFlow without
its C++ start-up lines (oneDNN notice, CPU feature guard) unless
`TF_CPP_MIN_LOG_LEVEL` is set. This package itself imports no TensorFlow, so
`dni-tf --help` is quick.
"""

# subcommand -> (module in this package, one-line description)
COMMANDS = {
    "gradient-drop": ("gradient_drop", "gradient dropping sweep over keep_prob"),
    "threshold-updates": ("threshold_updates",
                          "threshold-triggered, unsynchronised updates: a sweep over T"),
    "dni-feedforward": ("dni_feedforward",
                        "synthetic gradients (DNI, cDNI) for feed-forward nets (Jaderberg et al. 2016)"),
    "copy-task": ("copy_task", "recurrent DNI on Copy / Repeat Copy (Jaderberg et al. 2016)"),
    "language-model": ("language_model", "recurrent DNI on Penn Treebank characters (Jaderberg et al. 2016)"),
    "multi-network": ("multi_network", "two RNNs on two clocks joined by a synthetic gradient"),
    "targeted-dropout": ("targeted_dropout", "targeted dropout and magnitude pruning (Gomez et al. 2019)"),
    "report": ("report", "reproduction report: finished runs beside the published results"),
}


def run(name: str) -> None:
    """Runs the program in module `name` of this package as this process's command.

    absl's `--help` prints `__main__`'s docstring and the flags of the module
    named `sys.argv[0]`: both are pointed at the program's module.
    """
    import importlib
    import sys

    module = importlib.import_module(f"{__name__}.{name}")  # first: it quiets TensorFlow
    from dni_tf.harness import cli

    sys.modules["__main__"].__doc__ = module.__doc__
    sys.argv[0] = module.__name__
    cli.run(module.main)
