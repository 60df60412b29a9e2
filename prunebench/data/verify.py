"""Data integrity: every dataset file read from a data root is checked against the SHA-256 that its
folder records, once, and every file read is remembered for metrics.json.

Where digests come from: the `SOURCE.md` of the file's folder or of any folder above it up to the
data root (a Markdown table with a `file` and a `sha256` column; a `## <subfolder>/ ...` heading
prefixes the files of the tables below it, as in ../shared/data/marathi/SOURCE.md), or a
`SHA256SUMS` file in `sha256sum` format (`<hex>  <relative path>`; `prunebench data fetch` writes one).

Hash once: digests are remembered under `<cache_dir>/digests` by `prunebench.cache.file_digest`
(one small JSON per file, keyed by the resolved path and checked against size, mtime_ns, ctime_ns
and inode before reuse; written atomically: temp file, fsync, os.replace), so a warm run stats each
file instead of reading it, and a changed file is hashed again. The dense-baseline key reads the
same memo, so a file is hashed once for both.

The knob `data.verify` (conf/config.yaml) reaches this module once per run: `pipeline.run` calls
`configure(verify=cfg.data.verify, cache_dir=cfg.paths.cache_dir)` before anything is read. It is a
module-level setting (one run per process at a time, as Hydra's launchers run jobs), so the readers
in `text` and `labelled` need no extra argument. Without `configure` (tests, scripts) verification is
on and the cache is `$PRUNEBENCH_CACHE` or ~/.cache/prunebench. `verify=false` still hashes and
records, but a mismatch is a warning instead of an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from functools import lru_cache
from pathlib import Path

from prunebench import PrunebenchError, cache

log = logging.getLogger(__name__)

_HEX = re.compile(r"^[0-9a-f]{64}$")
_settings = {"verify": True, "cache_dir": None}
_used: dict[str, dict] = {}  # name -> record, in the order first read in this run


def configure(verify: bool = True, cache_dir: str | os.PathLike | None = None) -> None:
    """Set once per run (pipeline.run): whether a mismatch stops the run, and where the digest cache
    lives. Also starts a fresh record of the files read (`used`)."""
    if not isinstance(verify, bool):  # "maybe", 0, null: never guess which was meant
        raise PrunebenchError(f"data.verify must be true or false, got {verify!r}")
    _settings["verify"] = verify
    _settings["cache_dir"] = str(cache_dir) if cache_dir else None
    _used.clear()


def used() -> list[dict]:
    """The data read since `configure`: local files as {name, path, sha256, verified, status}, Hub
    datasets as {name, hub, config, split, revision}."""
    return list(_used.values())


# --- digests recorded beside the data ------------------------------------------------------------


@lru_cache(maxsize=256)
def _recorded(folder: Path, stamp: tuple) -> dict[str, tuple[str, str]]:
    """{path relative to folder: (sha256, recording file)} from folder/SOURCE.md and
    folder/SHA256SUMS. `stamp` (their mtimes) only keys the lru_cache: an edited file is parsed again."""
    digests: dict[str, tuple[str, str]] = {}
    source = folder / "SOURCE.md"
    if source.is_file():
        prefix, columns = "", None
        for line in source.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("#"):  # "## wikitext-2-raw/ — ..." scopes the tables below to that subfolder
                words = line.lstrip("#").split()
                prefix, columns = (words[0] if words and words[0].endswith("/") else ""), None
            elif not line.startswith("|"):
                columns = None
            else:
                cells = [c.strip().strip("`").lower() for c in line.strip().strip("|").split("|")]
                if columns is None and "file" in cells and "sha256" in cells:
                    columns = (cells.index("file"), cells.index("sha256"))
                elif columns is not None and len(cells) > max(columns) and _HEX.match(cells[columns[1]]):
                    name = line.strip().strip("|").split("|")[columns[0]].strip().split()[0].strip("`")
                    digests[prefix + name] = (cells[columns[1]], str(source))
    sums = folder / "SHA256SUMS"
    if sums.is_file():
        for line in sums.read_text(encoding="utf-8", errors="replace").splitlines():
            digest, _, name = line.partition(" ")
            if _HEX.match(digest.lower()):
                digests[name.strip().lstrip("*")] = (digest.lower(), str(sums))
    return digests


def expected(path: Path, root: Path | None = None) -> tuple[str | None, str | None]:
    """(recorded sha256, the file that records it) for a file, looking in its folder and each
    folder above it up to `root` (or up to 3 levels when no root is given); (None, None) if none."""
    path = Path(path)
    folders = [p for p in path.parents if root is None or p == Path(root) or Path(root) in p.parents]
    for folder in folders[: None if root is not None else 3]:
        stamp = tuple(_mtime(folder / n) for n in ("SOURCE.md", "SHA256SUMS"))
        if stamp == (None, None):
            continue
        found = _recorded(folder, stamp).get(path.relative_to(folder).as_posix())
        if found:
            return found
    return None, None


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


# --- hashing, once -------------------------------------------------------------------------------


def digest_dir() -> Path:
    """Where file digests are remembered across runs (shared with the other caches' input digests)."""
    root = _settings["cache_dir"] or os.environ.get("PRUNEBENCH_CACHE") or Path.home() / ".cache" / "prunebench"
    return Path(root) / "digests"


def sha256(path: Path) -> str:
    """The file's SHA-256, computed at most once per (path, size, mtime_ns, ctime_ns, inode): in this
    process and, through `prunebench.cache.file_digest`, across runs under `digest_dir()`."""
    return cache.file_digest(path, digest_dir())


# --- checking and recording ----------------------------------------------------------------------


def status(path: Path, root: Path | None = None) -> tuple[str, str | None, str | None]:
    """(ok | mismatch | missing | unverified, expected sha256, actual sha256) for one file."""
    want, _ = expected(path, root)
    if not Path(path).is_file():
        return "missing", want, None
    got = sha256(path)
    if want is None:
        return "unverified", None, got
    return ("ok" if got == want else "mismatch"), want, got


def check(path: Path, root: Path | None = None, name: str | None = None) -> Path:
    """Verify a data file before it is read and record it for metrics.json; one line on a mismatch
    (a warning with data.verify=false)."""
    path = Path(path)
    state, want, got = status(path, root)
    if state == "missing":
        raise PrunebenchError(f"data file {path} is missing; restore it (see its SOURCE.md) or set PRUNEBENCH_DATA")
    if state == "mismatch":
        _, source = expected(path, root)
        what = (
            f"data file {path} does not match the sha256 in {source}:"
            f" expected {want[:12]}…, found {got[:12]}… ({path.stat().st_size:,} bytes; truncated or corrupted?)"
        )
        if _settings["verify"]:
            raise PrunebenchError(
                f"{what}; restore the file from the source it names, or skip the check: data.verify=false"
            )
        log.warning("%s; reading it anyway (data.verify=false)", what)
    name = name or (path.relative_to(root).as_posix() if root else path.name)
    _used[name] = {"name": name, "path": str(path.resolve()), "sha256": got, "verified": state == "ok", "status": state}
    return path


def record_hub(name: str, hub: str, config: str | None, split: str | None, dataset=None) -> None:
    """Record a Hub fallback: the dataset id, config, split and the revision datasets resolved."""
    info = getattr(dataset, "info", None)
    revision = getattr(info, "version", None)
    _used[name] = {"name": name, "hub": hub, "config": config, "split": split,
                   "revision": str(revision) if revision else None,
                   "fingerprint": getattr(dataset, "_fingerprint", None)}  # fmt: skip


def write_sums(folder: Path, files: list[Path]) -> Path:
    """Add (or update) `files` in folder/SHA256SUMS, atomically, so fetched data verifies later."""
    sums = folder / "SHA256SUMS"
    lines = {}
    if sums.is_file():
        for line in sums.read_text(encoding="utf-8").splitlines():
            digest, _, name = line.partition(" ")
            lines[name.strip().lstrip("*")] = digest
    for f in files:
        lines[Path(f).relative_to(folder).as_posix()] = sha256(f)
    cache.write_bytes(sums, "".join(f"{d}  {n}\n" for n, d in sorted(lines.items())).encode())
    return sums


# --- reading, one line on bad bytes --------------------------------------------------------------


def read_text(path: Path) -> str:
    """The file as UTF-8 text; a binary or mis-encoded file is one line naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PrunebenchError(
            f"data file {path} is not UTF-8 text (byte {err.start}); restore it or point PRUNEBENCH_DATA elsewhere"
        ) from None


@contextlib.contextmanager
def parsing(path: Path):
    """Turn a parse error in a data file (bad row, bad JSON, bad encoding) into one line naming it."""
    try:
        yield
    except PrunebenchError:
        raise
    except UnicodeDecodeError as err:
        raise PrunebenchError(f"data file {path} is not UTF-8 text (byte {err.start}); restore it") from None
    except (ValueError, IndexError, KeyError, TypeError, EOFError, OSError) as err:
        raise PrunebenchError(
            f"data file {path} could not be parsed ({type(err).__name__}: {str(err)[:80]}); restore it"
        ) from None
