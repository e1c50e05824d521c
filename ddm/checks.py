"""Checks of the numbers a user types, shared by every command: finite, in range, one-line UsageError naming both.

`inf` and `nan` parse as floats, and a NaN compares False with everything, so `value > 0` alone lets NaN
through some checks and inf through all of them; these helpers refuse both first.
"""
from __future__ import annotations

import math

from ddm import UsageError

SEED_MAX = 2**32 - 1  # numpy and scikit-learn take seeds in [0, 2**32)


def check_range(flag: str, value, *, low=None, high=None, above=None, below=None) -> None:
    """UsageError unless `value` is a finite number with low <= value <= high and above < value < below
    (each bound optional)."""
    bounds = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
              f"<= {high}" if high is not None else "", f"< {below}" if below is not None else ""]
    wanted = " and ".join(b for b in bounds if b)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    ok = (
        math.isfinite(number)
        and (low is None or number >= low) and (high is None or number <= high)
        and (above is None or number > above) and (below is None or number < below)
    )
    if not ok:
        raise UsageError(f"{flag} {value} is out of range: must be a finite number{' ' + wanted if wanted else ''}")


def check_seed(value, flag: str = "--seed") -> None:
    check_range(flag, value, low=0, high=SEED_MAX)
    if int(value) != value:
        raise UsageError(f"{flag} {value} must be a whole number")
