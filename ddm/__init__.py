"""Decentralized Diffusion Models: data, partitioning, expert models and island training (the lower layers).

Sub-packages, bottom to top: `ddm.data` → `ddm.partition` → `ddm.models` → `ddm.training`. `ddm.io` and
`ddm.flow` sit below all of them; nothing in `ddm` imports `router`, `parallel_infer`, `evaluation` or `frontends`.
"""
from __future__ import annotations

import argparse
import errno
import sys

__version__ = "0.2.0"


class UsageError(ValueError):
    """Bad input from the user: the CLI prints it as one line and exits with code 2, before heavy work."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors often append pages of detail), for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) like every other bad input; `--help` shows usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


# Failures of the place a user told us to write (a full disk, a read-only folder): reported like bad input.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def run_reporting_usage_errors(run, *args) -> int:
    """`run(*args)`'s exit code; a UsageError, or a write refused by the disk (full, read-only, no permission),
    becomes one line on stderr and exit code 2 (for `ddm` and scripts)."""
    try:
        return run(*args) or 0
    except UsageError as e:
        message = str(e)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        message = f"cannot write {e.filename or 'the output'}: {e.strerror}"
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # safetensors' own I/O error (no OSError subclass)
            raise
        message = f"safetensors: {e}"
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
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
