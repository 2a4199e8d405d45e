"""`python -m experiments.language_model` from a checkout: `dni-tf language-model` (dni_tf/apps/language_model.py)."""
from dni_tf.apps.language_model import *  # noqa: F401,F403 - main, FLAGS, ... as before the move
if __name__ == "__main__":
    __import__("dni_tf.apps").apps.run("language_model")
