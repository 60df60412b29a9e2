"""Cache entries that cannot lie: keyed by what they were computed from, written atomically,
verified on read, built under a lock.

An entry is a file or a folder at `path` with a sidecar `<path>.sum.json` beside it: the key the
entry was computed from (a digest of weights, data files and config) and, for every file, its
size, SHA-256 (FIPS 180-4) and the stat seen right after it was written (mtime_ns, ctime_ns,
inode). Reading an entry:

- stat unchanged: trusted without rehashing, so a warm run costs one `stat` per file (any write
  changes a file's ctime, which no user tool can set back);
- stat changed: rehashed; the same SHA-256 is trusted (and the stat refreshed), anything else
  (no sidecar, another key, a wrong size, a checksum mismatch) is rebuilt after ONE warning line.

Builds run under a file lock (`<path>.lock`, filelock) into a temporary `.tmp-<name>~*` beside the
entry, are fsync'ed and renamed into place (`os.replace`): a reader sees the old entry or the new
one, never half of one, and no job deletes an entry another job is reading (a valid entry is never
removed; an invalid one is removed only under its lock). An interrupted build removes its temporary
in `finally`; what a killed process left behind is removed by the next builder of that entry
(it holds the lock, so nobody else is writing there).

Input files (data, source packages, weight folders) are hashed once and remembered by
(path, size, mtime_ns, ctime_ns, inode) under `<cache_dir>/digests`: unchanged files are never
rehashed on later runs.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from prunebench import PrunebenchError

log = logging.getLogger(__name__)
T = TypeVar("T")

MISSING = "missing"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import (os.umask can only be read by setting it)
_MEMO: dict[tuple, str] = {}  # (path, stat) -> sha256, within one process


def safe_name(name) -> str:
    """A config name (`model.name`, ...) made fit to be one file name inside the cache: only letters,
    digits, `.`, `_` and `-`, no leading dot, at most 80 characters. `model.name=../../x` thus names
    `x`-like file inside the cache dir instead of a path outside it; the entry's key (a digest of
    the whole config) keeps entries of different names apart."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name)).lstrip(".")[:80] or "unnamed"


def output_folder(value, knob: str) -> Path:
    """An output folder a knob names (`recovery.adapter_dir`): absolute as given, or a path relative
    to the run directory (the caller joins it). A relative path that climbs out of the run directory
    (`../x`) is refused: results go into the run dir, or where an absolute path says."""
    folder = Path(str(value)).expanduser()
    if not folder.is_absolute() and ".." in folder.parts:
        raise PrunebenchError(
            f"{knob}={value} leaves the run directory; give a folder inside it, or an absolute path to write elsewhere"
        )
    return folder


def usable_dir(folder, knob: str, advice: str = "") -> Path:
    """`folder` created if needed; one line when it cannot be (a file in its place, no permission)."""
    path = Path(str(folder)).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        what = "is a file, not a folder" if path.is_file() else f"cannot be created ({err.strerror or err})"
        raise PrunebenchError(f"{knob}={path} {what}; {advice or 'point it at a folder'}") from None
    return path


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stat(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_digest(path: str | os.PathLike, memo_dir: Path | None = None) -> str:
    """SHA-256 of an input file, hashed once and remembered by its stat (in this process, and
    under `memo_dir` across runs): unchanged files are not rehashed."""
    path = Path(path).resolve()
    stat = _stat(path)
    key = (str(path), tuple(stat))
    if key in _MEMO:
        return _MEMO[key]
    memo = Path(memo_dir) / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json" if memo_dir else None
    if memo is not None:
        try:
            m = json.loads(memo.read_text())
            if m["path"] == str(path) and m["stat"] == stat:
                _MEMO[key] = m["sha256"]
                return m["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no memo yet, or an unreadable one: hash again
    digest = _MEMO[key] = sha256_file(path)
    if memo is not None:
        with contextlib.suppress(OSError):  # a read-only cache only costs a rehash next time
            write_bytes(memo, json.dumps({"path": str(path), "stat": stat, "sha256": digest}).encode())
    return digest


def _tmp_prefix(path: Path) -> str:
    return f".tmp-{path.name}~"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_file():
            _fsync(p)
    _fsync(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None], prefix: str | None = None) -> None:
    """`write(tmp)` a file beside `path`, fsync it, rename it onto `path`. The temporary never
    survives an error or an interrupt (KeyboardInterrupt included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=prefix or _tmp_prefix(path), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results and caches are as readable as other files
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when something failed


def write_bytes(path: Path, data: bytes, prefix: str | None = None) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), prefix)


def write_json(path: Path, data: dict, prefix: str | None = None) -> None:
    write_bytes(path, json.dumps(data, indent=2, default=str).encode(), prefix)


@contextmanager
def lock(path: Path) -> Iterator[None]:
    """Exclusive lock on the entry at `path` across processes (`<path>.lock`)."""
    from filelock import FileLock, Timeout

    lk = FileLock(f"{path}.lock")
    try:
        lk.acquire(timeout=1)
    except Timeout:
        log.info("waiting for another job that is building %s", path)
        lk.acquire()
    try:
        yield
    finally:
        lk.release()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sum.json")


def _files(path: Path) -> list[str]:
    """Paths of the entry's files relative to it ('' for a file entry)."""
    if not path.is_dir():
        return [""]
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def check(path: Path, key: str) -> str | None:
    """None if the entry at `path` is intact and was computed from `key`; else what is wrong
    (`MISSING` when there is simply no entry). Call it under `lock(path)`: it may refresh stats."""
    side = sidecar(path)
    if not side.exists():
        return "has no checksum file (an interrupted build or an older prunebench)" if path.exists() else MISSING
    try:
        meta = json.loads(side.read_text())
        files, their_key = meta["files"], meta["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return "has an unreadable checksum file"
    if not path.exists():
        return MISSING
    if their_key != key:
        return "was computed from other inputs"
    refreshed = False
    for rel, want in files.items():
        f = path / rel if rel else path
        try:
            stat = _stat(f)
        except OSError:
            return f"is missing {rel or 'its file'}"
        if stat[0] != want["size"]:
            return f"{rel or 'file'} has {stat[0]} bytes instead of {want['size']} (truncated?)"
        if stat != want["stat"]:
            if sha256_file(f) != want["sha256"]:
                return f"{rel + ' ' if rel else ''}fails its SHA-256 check (corrupted)"
            want["stat"], refreshed = stat, True  # same bytes, e.g. a copied cache: trust and remember
    if refreshed:
        write_json(side, meta, _tmp_prefix(path))
    return None


def remove_orphans(path: Path) -> None:
    """Temporaries of `path` left by a killed build. Call under `lock(path)`."""
    for p in path.parent.glob(glob.escape(_tmp_prefix(path)) + "*"):
        _remove(p)


def entry(
    path: str | os.PathLike,
    key: str,
    build: Callable[[Path], T],
    load: Callable[[Path], T],
    what: str,
    folder: bool = False,
) -> tuple[T, bool]:
    """(value, reused). `load(path)` when the entry is intact and was computed from `key`;
    otherwise `build(tmp)` writes the file (or fills the folder, when `folder`) at tmp and returns
    the value (or None: then `load` reads it back once in place), and the entry is put in place.
    All of it under the entry's lock, so concurrent jobs build once and never read or remove a
    half-built entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock(path):
        remove_orphans(path)
        problem = check(path, key)
        if problem is None:
            return load(path), True
        if problem != MISSING:
            log.warning("%s: the cache %s %s; rebuilding it", what, path, problem)
        value = _build(path, key, build, folder)
        return (load(path) if value is None else value), False


def _build(path: Path, key: str, build: Callable[[Path], T], folder: bool) -> T:
    prefix = _tmp_prefix(path)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, (0o777 if folder else 0o666) & ~_UMASK)  # mkstemp/mkdtemp make them private
    old = None
    side = sidecar(path)
    done = False
    try:
        value = build(tmp)
        _fsync_tree(tmp)
        sums = {rel: {"size": 0, "sha256": sha256_file(tmp / rel if rel else tmp)} for rel in _files(tmp)}
        side.unlink(missing_ok=True)  # from here on the old entry is invalid
        if path.is_dir() and not path.is_symlink():  # a folder cannot be replaced in one rename: move it away first
            old = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
            os.replace(path, old)
        os.replace(tmp, path)
        for rel, s in sums.items():
            s["stat"] = _stat(path / rel if rel else path)
            s["size"] = s["stat"][0]
        write_json(side, {"key": key, "files": sums}, prefix)
        done = True
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                _remove(leftover)
        if not done and not side.exists() and path.exists():
            _remove(path)  # renamed into place but never sealed: not an entry
    return value


class RunDirBusy(Exception):
    """Another live process holds the run directory (see `run_dir_lock`)."""


_HELD: dict[str, int] = {}  # run directories this process holds: path -> how many holders


@contextmanager
def run_dir_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on a run (or sweep) directory for the whole run, so two runs started into one
    folder never both write results: the second refuses at once (`RunDirBusy`). It is flock(2) on the
    directory itself: no lock file is left behind, and the kernel drops it when the holder exits or is
    killed, so a rerun (or a resume from checkpoints) after the first process ended is never blocked.
    Re-entrant within a process (the CLI takes it before Hydra writes .hydra/, the job again).
    Platforms without fcntl (Windows) run unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(folder).resolve()
    key = str(path)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(str(path)) from None
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def fingerprint(*parts: Any) -> str:
    """Stable short hash of config fragments, used as a cache key."""
    blob = json.dumps(
        [OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
