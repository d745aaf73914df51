"""What tests run but do not test: the torchrun launcher, its worker scripts and the local Slurm cluster."""
