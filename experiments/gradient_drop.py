"""`python -m experiments.gradient_drop` from a checkout: `dni-tf gradient-drop` (dni_tf/apps/gradient_drop.py)."""
from dni_tf.apps.gradient_drop import *  # noqa: F401,F403 - main, FLAGS, ... as before the move
if __name__ == "__main__":
    __import__("dni_tf.apps").apps.run("gradient_drop")
