"""`dni-tf SUBCOMMAND --workdir=DIR [flags]` (also `python -m dni_tf.apps ...`).

`dni-tf --help` lists the subcommands, `dni-tf SUBCOMMAND --help` its flags.
Only the chosen subcommand's module is imported: absl flags are global to the
process, and the studies define flags of the same names.
"""

import sys
from typing import List, Optional

from dni_tf import apps

PROGRAM = "dni-tf"


def usage() -> str:
    width = max(len(name) for name in apps.COMMANDS)
    lines = [f"usage: {PROGRAM} SUBCOMMAND --workdir=DIR [flags]", "",
             "Learning with partial, late, predicted or unsynchronised gradients "
             "(dni_tf).", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {description}"
              for name, (_, description) in apps.COMMANDS.items()]
    lines += ["", f"`{PROGRAM} SUBCOMMAND --help` lists a subcommand's flags "
              "(--helpfull: every flag)."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "-help", "--helpshort", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in apps.COMMANDS:
        print(f"error: {PROGRAM}: unknown subcommand {name!r}: choose from "
              f"{', '.join(apps.COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"{PROGRAM} {name}", *argv[2:]]
    apps.run(apps.COMMANDS[name][0])


if __name__ == "__main__":
    main()
