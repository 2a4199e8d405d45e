"""`python -m experiments.dni_feedforward` from a checkout: `dni-tf dni-feedforward` (dni_tf/apps/dni_feedforward.py)."""
from dni_tf.apps.dni_feedforward import *  # noqa: F401,F403 - main, FLAGS, ... as before the move
if __name__ == "__main__":
    __import__("dni_tf.apps").apps.run("dni_feedforward")
