"""Captions: of an image folder (two common conventions), of the embedded digits (generated), and prompt files.

An image folder is captioned either way (both may be present; a sidecar wins):
  - a sidecar text file per image: `cat.png` + `cat.txt` (the caption is its text, stripped);
  - a `metadata.jsonl` at the folder's root with one `{"file_name": "cat.png", "text": "..."}` per line, paths
    relative to the root (the Hugging Face `imagefolder` convention).
An image with neither is an error listing the first few such files, unless `allow_empty` (then it gets "", the
empty caption, which is also the unconditional branch of classifier-free guidance).
"""
from __future__ import annotations

import json
from pathlib import Path

from ddm import UsageError

METADATA = "metadata.jsonl"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# A few phrasings per class, so the model meets more than one way of asking for a digit.
DIGIT_PHRASINGS = ("a handwritten {name}", "the digit {name}", "a drawing of the number {name}", "{name} written by hand")


def digit_caption(label: int, index: int) -> str:
    """The caption of digit sample `index` with class `label`: its phrasing cycles with the index (deterministic)."""
    return DIGIT_PHRASINGS[index % len(DIGIT_PHRASINGS)].format(name=DIGIT_NAMES[label])


def digit_captions(labels) -> list[str]:
    return [digit_caption(int(label), i) for i, label in enumerate(labels)]


def digit_vocabulary() -> list[str]:
    """Every word of the digit captions (the embedded text encoder's word list)."""
    words = {w for name in DIGIT_NAMES for p in DIGIT_PHRASINGS for w in p.format(name=name).split()}
    return sorted(words)


def read_metadata(root: Path) -> dict[str, str]:
    """{relative file name: caption} from root/metadata.jsonl (empty if there is none)."""
    path = root / METADATA
    if not path.is_file():
        return {}
    captions = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8: {e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{number}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
            raise UsageError(f"{path}:{number}: each line needs a string 'file_name' and a string 'text'")
        captions[Path(row["file_name"]).as_posix()] = row["text"].strip()
    return captions


def read_sidecar(image: Path) -> str | None:
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    try:
        return sidecar.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise UsageError(f"caption file {sidecar} is not UTF-8: {e}") from None


def folder_captions(root: str | Path, files: list[Path], allow_empty: bool = False) -> list[str]:
    """One caption per image file of an image folder (order of `files`)."""
    root = Path(root)
    metadata = read_metadata(root)
    captions, missing = [], []
    for f in files:
        caption = read_sidecar(f)
        if caption is None:
            caption = metadata.get(f.relative_to(root).as_posix())
        if caption is None:
            missing.append(f.relative_to(root).as_posix())
            caption = ""
        captions.append(caption)
    if missing and not allow_empty:
        raise UsageError(
            f"{len(missing)} of {len(files)} images in {root} have no caption (no sidecar .txt, not in {METADATA}): "
            f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; give --allow-empty-captions to use the empty caption"
        )
    return captions


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per non-blank line of a UTF-8 text file; an empty file or one that is not UTF-8 is refused."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UsageError(f"--prompts {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompts {path} is not UTF-8 (byte {e.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {path} holds no prompt (one per line)")
    return prompts


def digit_class_of(prompt: str) -> int | None:
    """The digit a prompt asks for (exactly one digit name among its words), else None (for scoring digit prompts)."""
    named = {DIGIT_NAMES.index(w) for w in prompt.lower().split() if w in DIGIT_NAMES}
    return named.pop() if len(named) == 1 else None
