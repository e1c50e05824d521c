"""Input checks shared by the app's actions (app_actions.py, frontends/app_video.py): the folders the app may
read, and numbers in range. Each failure is a friendly `gr.Error` naming the field and the value, raised before any
heavy work."""
from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

import gradio as gr

from ddm import UsageError

# A user's mistake: shown in the UI, not logged as a server traceback.
UserError = functools.partial(gr.Error, print_exception=False)
MAX_STEPS = 200


class AllowedRoots:
    """The only folders the app reads from. Relative UI paths are taken from the folder the app was started in,
    as relative `--allow-dir` and `--demo-dir` are, so `python app.py --allow-dir runs` can open `runs/...`."""

    def __init__(self, roots: list[Path], base: Path | None = None):
        self.base = (base or Path.cwd()).resolve()
        self.roots = [(self.base / Path(r).expanduser()).resolve() for r in roots]

    def dir(self, text: str | None, what: str) -> Path:
        """The resolved directory, if it and every symlink inside it stay within the roots; else a UserError."""
        text = (text or "").strip()
        if not text:
            raise UserError(f"{what}: please enter a directory.")
        path = Path(text).expanduser()
        try:
            resolved = (self.base / path).resolve()
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a symlink loop
            raise UserError(f"{what} {text!r} is not a valid path.") from None
        # Checked before existence, so the app says nothing about what lies outside its roots.
        if not self.allows(resolved):
            raise UserError(f"{what} {text!r} is outside the folders this app may read ({self.describe()}); start the app with --allow-dir DIR to add one.")
        if not resolved.is_dir():
            raise UserError(f"{what} {text!r} is not a directory.")
        for folder, dirs, files in os.walk(resolved):  # does not follow links: each is checked instead
            for name in dirs + files:
                entry = Path(folder, name)
                if entry.is_symlink() and not self.allows(entry.resolve()):
                    raise UserError(
                        f"{what} {text!r} holds a link ({entry.relative_to(resolved)}) to a place outside "
                        f"the folders this app may read ({self.describe()})."
                    )
        return resolved

    def allows(self, resolved: Path) -> bool:
        return any(resolved.is_relative_to(root) for root in self.roots)

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.roots)


def friendly(fn):
    """Back-end usage errors (UsageError, a bad config) reach the user as one readable gr.Error line; also those a
    generator raises while Gradio iterates it."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UsageError as e:
                raise UserError(str(e)) from None

        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            raise UserError(str(e)) from None

    return wrapper


def int_in_range(value, name: str, low: int, high: int) -> int:
    if value is None or (isinstance(value, float) and not value.is_integer()):
        raise UserError(f"{name} must be a whole number between {low} and {high}, got {value!r}.")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number between {low} and {high}, got {value!r}.") from None
    if not low <= number <= high:
        raise UserError(f"{name} must be between {low} and {high}, got {number}.")
    return number


def float_in_range(value, name: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number between {low} and {high}, got {value!r}.") from None
    if not low <= number <= high:  # also refuses NaN
        raise UserError(f"{name} must be between {low} and {high}, got {value!r}.")
    return number
