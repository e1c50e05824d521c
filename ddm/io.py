"""Atomic writes: every artifact on disk appears whole or not at all (temp file + rename)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries: give them the usual umask-based mode, then rename."""
    os.chmod(tmp, mode & ~_umask())
    os.replace(tmp, path)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, 0o666)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file through a temp name; tensors are made contiguous (safetensors requires it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, 0o666)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_replace_dir(staging: Path, final: Path) -> None:
    """Move a fully written staging directory to `final`, replacing any old one.

    POSIX cannot rename onto a non-empty directory, so the old one is first renamed aside; a crash in
    between leaves `final.old` (whole) next to `final` (missing), never a half-written `final`.
    """
    staging, final = Path(staging), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)


def replaced_dir(final: Path) -> Path:
    """The directory to read for `final`: itself, or the whole `final.old` that a kill between
    `atomic_replace_dir`'s two renames left in its place. Readers call this instead of renaming anything back."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    return old if not final.exists() and old.is_dir() else final


def staging_dir(final: Path) -> Path:
    """A fresh empty directory beside `final`, on the same filesystem, for `atomic_replace_dir`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".staging"))
    os.chmod(staging, 0o777 & ~_umask())
    return staging
