"""What every writer does on disk (docs/reliability.md): artifacts appear whole or not at all (temp file +
rename), replace only output folders that ddm marked as the same kind of artifact, carry the SHA-256 of every
file they hold, and are written by one process at a time (an exclusive lock the OS releases when it dies).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ddm import UsageError

OWNER_FILE = ".ddm-owner.json"  # the mark: which kind of artifact ddm wrote here, and its files' SHA-256
OWNER_FORMAT = "ddm-owner/1"
LOCK_FILE = ".ddm-lock"  # inside an output folder while a process writes it (see output_lock)
BOOKKEEPING = {OWNER_FILE, LOCK_FILE}  # never part of an artifact's files


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
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as e:  # the disk refused it (full, too large): safetensors' error is no OSError
            raise UsageError(f"cannot write {path}: {e}") from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, 0o666)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_replace_dir(staging: Path, final: Path, *, kind: str, what: str = "--out", check_owner: bool = True) -> None:
    """Move a fully written staging directory to `final`, replacing the old one only if it is ours.

    `final` (and a `final.old` a crash left) must be absent, empty, or a folder ddm marked as the same `kind`
    holding none but its own files (`check_owned`), else UsageError and nothing is touched; `check_owner=False`
    only for a sub-folder of an output the caller already claimed (a trainer's state/). The staging
    directory is marked as `kind` with the SHA-256 of every file first, so readers can verify it.
    POSIX cannot rename onto a non-empty directory, so the old one is first renamed aside; a crash in
    between leaves `final.old` (whole) next to `final` (missing), never a half-written `final`.
    """
    staging, final = Path(staging), Path(final)
    if check_owner:
        check_owned(final, kind, what, writable=False)
    mark_owned(staging, kind, tree_digests(staging))
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


# --- checksums ---------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file below `root` (relative POSIX path -> hex), marks left out."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name not in BOOKKEEPING}


def verify_digests(root: Path, digests: dict[str, str], what: str) -> None:
    """UsageError naming the first file that is missing or whose bytes no longer match its recorded SHA-256."""
    root = Path(root)
    for rel, expected in sorted(digests.items()):
        f = root / rel
        if not f.is_file():
            raise UsageError(f"{what} {root} is incomplete: {rel} is missing")
        if sha256_file(f) != expected:
            raise UsageError(f"{what} {root} is damaged: {rel} does not match its recorded SHA-256 checksum")


# --- own your output ---------------------------------------------------------------------------------------

def read_owner(path: Path) -> dict | None:
    """The mark of a folder ddm wrote ({"kind", optionally "files"}), or None (no mark, or not one of ours)."""
    try:
        mark = json.loads((Path(path) / OWNER_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return mark if isinstance(mark, dict) and mark.get("format") == OWNER_FORMAT and isinstance(mark.get("kind"), str) else None


def mark_owned(path: Path, kind: str, files: dict[str, str] | None = None) -> None:
    """Mark `path` (created if needed) as a `kind` folder of ddm. Writers mark a new folder before anything else;
    a folder written whole (staging + rename) also lists its files, so nothing else in it is ever taken for ours."""
    mark = {"format": OWNER_FORMAT, "kind": kind}
    if files is not None:
        mark["files"] = files
    atomic_write_json(Path(path) / OWNER_FILE, mark)


def verify_owned(path: Path, what: str) -> None:
    """Check the files a folder's mark lists against their SHA-256 (a folder without a file list passes)."""
    mark = read_owner(path)
    if mark is None and (Path(path) / OWNER_FILE).exists():
        raise UsageError(f"{what} {path} is damaged: its {OWNER_FILE} is unreadable")
    if mark is not None and isinstance(mark.get("files"), dict):
        verify_digests(path, mark["files"], what)


def check_owned(path: Path, kind: str, what: str = "--out", writable: bool = True) -> None:
    """UsageError unless ddm may write the folder `path` as a `kind`: it is absent, empty, or marked as a `kind`
    (and, when the mark lists its files, holds no other file). The same holds for a `path.old` a crash left.
    With `writable`, also that the folder can be created or written (`check_writable`)."""
    path = Path(path)
    for folder in (path, path.with_name(path.name + ".old")):
        if not folder.exists() and not folder.is_symlink():
            continue
        if folder.is_symlink() or not folder.is_dir():
            raise UsageError(f"{what} {folder} exists and is not a directory; refusing to replace it")
        entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)
        if not entries:
            continue
        mark = read_owner(folder)
        if mark is None:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise UsageError(f"{what} {folder} is not empty and was not written by ddm ({shown}); refusing to touch it")
        if mark["kind"] != kind:
            raise UsageError(f"{what} {folder} holds a ddm {mark['kind']} (expected: {kind}); refusing to replace it")
        if isinstance(mark.get("files"), dict):
            foreign = [rel for rel in tree_digests(folder) if rel not in mark["files"]]
            if foreign:
                raise UsageError(
                    f"{what} {folder} holds files that are not part of its {kind} ({', '.join(foreign[:3])}); "
                    "move them out first"
                )
    if writable:
        check_writable(path, what, directory=True)


def claim_dir(path: Path, kind: str, what: str = "--out") -> Path:
    """An output folder written in place (a trainer's, a batch of videos): checked with `check_owned`, then
    created and marked as `kind` before anything else is written into it."""
    path = Path(path)
    check_owned(path, kind, what)
    if read_owner(path) is None:
        mark_owned(path, kind)
    return path


@contextlib.contextmanager
def replacing_dir(final: Path, kind: str, what: str = "--out", check_owner: bool = True):
    """`with replacing_dir(out, "router") as staging: save into staging` -> `out` replaced whole by staging,
    marked as `kind` with its files' SHA-256, or UsageError and `out` untouched if `out` is not ours. On an
    error the staging folder is removed and `out` stays as it was."""
    final = Path(final)
    if check_owner:
        check_owned(final, kind, what)
    staging = staging_dir(final)
    try:
        yield staging
        atomic_replace_dir(staging, final, kind=kind, what=what, check_owner=check_owner)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_writable(path: Path, what: str = "--out", directory: bool = False) -> None:
    """UsageError, before any work, when `path` cannot be written: it has the wrong type, or its nearest existing
    folder is not a folder or refuses a new file (read-only, no permission). Missing parents are fine (created)."""
    path = Path(os.path.abspath(path))
    if path.exists():
        if directory and not path.is_dir():
            raise UsageError(f"{what} {path} exists and is not a directory")
        if not directory and path.is_dir():
            raise UsageError(f"{what} {path} is a directory, not a file")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{what} {path} cannot be created: {ancestor} is not a directory")
    for folder in {ancestor, path} if path.is_dir() else {ancestor}:
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".ddm-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UsageError(f"{what} {path} is not writable: {e.strerror} ({folder})") from None


def json_format(path: Path) -> str | None:
    """The "format" field of a JSON file (how ddm marks files it wrote), or None."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def check_json_output(path: Path, fmt: str, what: str = "--out") -> None:
    """A JSON file ddm will write: writable, and if it exists, one that ddm wrote in format `fmt`."""
    path = Path(path)
    check_writable(path, what)
    if path.exists() and json_format(path) != fmt:
        raise UsageError(f"{what} {path} exists and is not a {fmt} file written by ddm; refusing to overwrite it")


# --- one writer at a time ------------------------------------------------------------------------------------

@contextlib.contextmanager
def output_lock(path: Path, what: str = "--out", folder: bool = True):
    """Hold an exclusive lock on the output `path` while writing it; UsageError naming the holder's PID if another
    process holds it, or if `path` cannot be written.

    The lock is `fcntl.flock` on a lock file, so the OS drops it when the process dies and a kill never leaves a
    stale lock; the file holds the holder's PID. A folder output keeps it inside (`.ddm-lock`: a run writes nowhere
    else; the folder is created for it, and removed again if it stays empty), a file output beside it
    (`.<name>.lock`). Creating it is also the check that the output can be written.
    """
    path = Path(os.path.abspath(path))
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} exists and is not a directory")
    lock_path = path / LOCK_FILE if folder else path.with_name(f".{path.name}.lock")
    created = []
    parent = lock_path.parent
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock_path, path, what)
    except OSError as e:
        _remove_empty(created)
        raise UsageError(f"{what} {path} is not writable: {e.strerror} ({e.filename})") from None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):  # still held: remove it unless a replaced folder took it away already
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                os.unlink(lock_path)
        os.close(fd)
        _remove_empty(created)


def _acquire(lock_path: Path, path: Path, what: str) -> int:
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UsageError(f"{what} {path}: cannot lock {lock_path}: {e.strerror}") from None
            raise UsageError(
                f"{what} {path} is being written by another process (PID {holder}); wait for it or choose another {what}"
            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed that file as we locked it: lock the new one


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


def load_pretrained(cls, path: Path, what: str, **kwargs):
    """`cls.from_pretrained(path, use_safetensors=True, ...)`: weights from safetensors only (a pickle .bin is
    refused, never unpickled), and any failure to load as a one-line UsageError naming `what` and the folder."""
    from ddm import first_line

    try:
        return cls.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, SafetensorError, ValueError, TypeError, KeyError, RuntimeError, json.JSONDecodeError) as e:
        where = Path(path) / kwargs.get("subfolder", "")
        raise UsageError(f"cannot load {what} from {where}: {first_line(e)}") from None


def recorded_folder(record: dict) -> Path:
    """The folder an expert.json record (VAE, text encoder) names: its path as given where that is a folder (a copied
    project), else the absolute path it had when recorded."""
    return Path(record["path"]) if Path(record["path"]).is_dir() else Path(record["abspath"])
