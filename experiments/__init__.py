"""absl entry points: `python -m experiments.NAME --workdir=DIR`."""
