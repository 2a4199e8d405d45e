"""`python -m experiments.multi_network` from a checkout: `dni-tf multi-network` (dni_tf/apps/multi_network.py)."""
from dni_tf.apps.multi_network import *  # noqa: F401,F403 - main, FLAGS, ... as before the move
if __name__ == "__main__":
    __import__("dni_tf.apps").apps.run("multi_network")
