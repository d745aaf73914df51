"""Slurm submission from the Hydra config: `scifm submit` renders slurm/*.sbatch into the run
directory and calls sbatch; `scifm jobs` reports the state of a run's jobs."""
