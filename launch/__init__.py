"""Launchers that start `python -m experiments.run` on a Cloud TPU slice or a SLURM GPU cluster."""
