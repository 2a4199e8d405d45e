"""`python -m experiments.report` from a checkout: `dni-tf report` (dni_tf/apps/report.py)."""
from dni_tf.apps.report import *  # noqa: F401,F403 - main, FLAGS, ... as before the move
if __name__ == "__main__":
    __import__("dni_tf.apps").apps.run("report")
