"""Decentralized Diffusion Models: data, partitioning, expert models and island training (the lower layers).

Sub-packages, bottom to top: `ddm.data` → `ddm.partition` → `ddm.models` → `ddm.training`. `ddm.io` and
`ddm.flow` sit below all of them; nothing in `ddm` imports `router`, `parallel_infer`, `evaluation` or `frontends`.
"""
from __future__ import annotations

import sys

__version__ = "0.2.0"


class UsageError(ValueError):
    """Bad input from the user: the CLI prints it as one line and exits with code 2, before heavy work."""


def run_reporting_usage_errors(run, *args) -> int:
    """`run(*args)`'s exit code; a UsageError becomes one line on stderr and exit code 2 (for `ddm` and scripts)."""
    try:
        return run(*args) or 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
