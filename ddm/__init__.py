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


def command_args(add_arguments, **options):
    """The argparse namespace a command's `run` takes, from keyword arguments instead of a command line.

    The Python API of every step (`partition`, `train_island`, `train_router`, `sample`) goes through this, so it
    gets the CLI's defaults and the CLI's checks: unknown names, missing required options, wrong types and values
    outside `choices` are UsageErrors, and `run` validates the rest as it does for the CLI.
    """
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(set(options) - set(actions))
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r}; options are {', '.join(sorted(actions))}")
    values = {dest: a.default for dest, a in actions.items()}
    for dest, value in options.items():
        action = actions[dest]
        numeric = action.type in (int, float)
        if value is not None and numeric and (isinstance(value, bool) or not isinstance(value, (int, float)) or (action.type is int and not isinstance(value, int))):
            raise UsageError(f"{dest} must be {action.type.__name__}, got {value!r}")
        if value is not None and action.nargs in ("+", "*"):
            value = [str(v) if action.type is None else v for v in value] if isinstance(value, (list, tuple)) else [value]
        elif value is not None and action.type is None and not isinstance(value, bool):
            value = str(value)  # paths and specs are strings on the command line
        if action.choices is not None and value is not None and value not in action.choices:
            raise UsageError(f"{dest} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
        values[dest] = value
    missing = [dest for dest, a in actions.items() if a.required and values[dest] is None]
    if missing:
        raise UsageError(f"missing required option {missing[0]!r}")
    return argparse.Namespace(**values)
