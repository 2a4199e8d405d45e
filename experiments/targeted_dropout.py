"""`python -m experiments.targeted_dropout` from a checkout: `dni-tf targeted-dropout` (dni_tf/apps/targeted_dropout.py)."""
from dni_tf.apps.targeted_dropout import *  # noqa: F401,F403 - main, FLAGS, ... as before the move
if __name__ == "__main__":
    __import__("dni_tf.apps").apps.run("targeted_dropout")
