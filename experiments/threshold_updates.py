"""`python -m experiments.threshold_updates` from a checkout: `dni-tf threshold-updates` (dni_tf/apps/threshold_updates.py)."""
from dni_tf.apps.threshold_updates import *  # noqa: F401,F403 - main, FLAGS, ... as before the move
if __name__ == "__main__":
    __import__("dni_tf.apps").apps.run("threshold_updates")
