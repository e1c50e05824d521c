"""Decentralized Diffusion Models: data, partitioning, experts, island training, evaluation."""


class UsageError(ValueError):
    """Bad input from the user: the CLI prints it as one line and exits with code 2, before heavy work."""
