"""md5 checksums of data files, remembered in the cache so that a load does not reread them.

A file's md5 is stored under ``<cache>/checksums/`` keyed by its real path, together with
the size, modification time and inode it had; any change to those recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from .errors import CorpusError
from .paths import atomic_write

_CHUNK = 1 << 20


def md5_of(path: Path) -> str:
    """The md5 hex digest of a file's bytes (no caching)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _signature(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def file_md5(path: str | os.PathLike, cache: Path | None) -> str:
    """A file's md5, taken from the checksum cache when the file has not changed.

    Args:
        path: the file.
        cache: the cache root (``paths.cache_root()``), or None to always recompute.

    Returns:
        The md5 hex digest.
    """
    path = Path(path).resolve()
    if cache is None:
        return md5_of(path)
    key = hashlib.sha1(str(path).encode()).hexdigest()
    record_path = cache / "checksums" / f"{key}.json"
    sig = _signature(path)
    try:
        record = json.loads(record_path.read_text())
        if record.get("path") == str(path) and record.get("signature") == sig:
            return record["md5"]
    except (OSError, ValueError, KeyError):
        pass
    digest = md5_of(path)
    record = {"path": str(path), "signature": sig, "md5": digest}
    try:
        atomic_write(record_path, lambda tmp: tmp.write_text(json.dumps(record)))
    except OSError as e:
        warnings.warn(f"could not write checksum cache {record_path}: {e}", stacklevel=2)
    return digest


def verify_md5(path: Path, expected: str, cache: Path | None) -> None:
    """Raise CorpusError if a file's md5 is not ``expected``.

    Args:
        path: the file.
        expected: the md5 hex digest it must have.
        cache: the cache root for remembering checksums, or None.
    """
    got = file_md5(path, cache)
    if got != expected:
        raise CorpusError(
            f"{path} fails its md5 check (got {got}, expected {expected}): the file is "
            f"corrupted or a different version; replace it with the original file"
        )
