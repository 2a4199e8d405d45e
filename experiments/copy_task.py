"""`python -m experiments.copy_task` from a checkout: `dni-tf copy-task` (dni_tf/apps/copy_task.py)."""
from dni_tf.apps.copy_task import *  # noqa: F401,F403 - main, FLAGS, ... as before the move
if __name__ == "__main__":
    __import__("dni_tf.apps").apps.run("copy_task")
