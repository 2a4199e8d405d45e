"""Checkout shims: `python -m experiments.NAME` runs `dni_tf.apps.NAME` (installed: `dni-tf`).

Not installed: `pip install` provides the `dni-tf` command instead.
"""
