"""Batch prompt files for `scripts/render_videos.py`: plain lines or JSON lines, read and checked whole.

Each non-empty line is either a prompt, or (starting with "{") a JSON object with the keys

    prompt (text, required)   seed (integer)   negative_prompt (text)   seconds (number > 0)   name (text)

A line without a seed takes --seed. With --seeds-per-prompt N a line renders N videos, seeds s .. s + N - 1.
Video files are named `<name>-seed<seed>.mp4`, `name` defaulting to the prompt in lower-case words joined by
"-": a name does not depend on the line's position, so editing the file keeps finished videos findable, and a
re-run skips them. Every line is checked before any model loads; an error names the file and line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ddm import UsageError

KEYS = {"prompt": str, "seed": int, "negative_prompt": str, "seconds": (int, float), "name": str}
_TYPE_NAMES = {"prompt": "text", "seed": "an integer", "negative_prompt": "text", "seconds": "a number", "name": "text"}


@dataclass(frozen=True)
class PromptLine:
    line: int  # 1-based line number in the file
    prompt: str
    seed: int | None = None
    negative_prompt: str | None = None
    seconds: float | None = None
    name: str | None = None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "video"


def parse_line(text: str, path: Path, line: int) -> PromptLine | None:
    text, where = text.strip(), f"{path} line {line}"
    if not text:
        return None
    if not text.startswith("{"):
        return PromptLine(line, text)
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: a JSON line must be an object with keys {', '.join(KEYS)}")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; keys are {', '.join(KEYS)}")
    for key, value in entry.items():
        if isinstance(value, bool) or not isinstance(value, KEYS[key]):
            raise UsageError(f"{where}: {key} must be {_TYPE_NAMES[key]}, got {json.dumps(value)}")
    if not entry.get("prompt", "").strip():
        raise UsageError(f"{where}: needs a non-empty \"prompt\"")
    if "seed" in entry and entry["seed"] < 0:
        raise UsageError(f"{where}: seed must be >= 0, got {entry['seed']}")
    if "seconds" in entry and not entry["seconds"] > 0:
        raise UsageError(f"{where}: seconds must be > 0, got {entry['seconds']}")
    if "name" in entry and slug(entry["name"]) != entry["name"]:
        raise UsageError(f"{where}: name {entry['name']!r} must be lower-case letters, digits and '-' (e.g. {slug(entry['name'])!r})")
    return PromptLine(line, entry["prompt"].strip(), entry.get("seed"), entry.get("negative_prompt"),
                      entry.get("seconds"), entry.get("name"))


def read_prompt_file(path: Path) -> list[PromptLine]:
    if not path.is_file():
        raise UsageError(f"prompts file not found: {path}")
    lines = [parse_line(text, path, i) for i, text in enumerate(path.read_text().splitlines(), 1)]
    lines = [line for line in lines if line is not None]
    if not lines:
        raise UsageError(f"no prompts in {path}")
    return lines


def expand(lines: list[PromptLine], seed: int, seeds_per_prompt: int, path: Path) -> list[tuple[PromptLine, int, str]]:
    """(line, seed, file name) per video; two videos with one file name are a UsageError naming both lines."""
    if not isinstance(seeds_per_prompt, int) or seeds_per_prompt < 1:
        raise UsageError(f"--seeds-per-prompt must be >= 1, got {seeds_per_prompt}")
    videos, owner = [], {}
    for line in lines:
        first = seed if line.seed is None else line.seed
        for s in range(first, first + seeds_per_prompt):
            name = f"{line.name or slug(line.prompt)}-seed{s}.mp4"
            if name in owner:
                raise UsageError(f"{path} lines {owner[name]} and {line.line} both make {name}: give one a \"name\" or another \"seed\"")
            owner[name] = line.line
            videos.append((line, s, name))
    return videos
