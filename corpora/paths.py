"""Where corpora live: the cache directory, data directories, and atomic file writes.

Loading order for files that ship separately (Penn Treebank, local WikiText copies):

    1. an explicit directory (``data_dir=``, the CLI's ``--data-dir``): authoritative,
       nothing else is searched;
    2. ``$DNI_RNN_DATA_DIR``;
    3. the cache, ``$DNI_RNN_CACHE_DIR`` (default ``~/.cache/dni_rnn``);
    4. a download into the cache.

A data directory may hold a corpus's files directly or in a subdirectory named after the
corpus (``ptb/``), so both ``DNI_RNN_DATA_DIR=shared/data`` and ``--data-dir shared/data/ptb``
work. Nothing is ever written beside the data: data directories may be read-only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import CorpusError

DATA_DIR_ENV = "DNI_RNN_DATA_DIR"
CACHE_DIR_ENV = "DNI_RNN_CACHE_DIR"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: the argument, else $DNI_RNN_CACHE_DIR, else ~/.cache/dni_rnn.

    Args:
        cache_dir: an explicit cache directory, or None.

    Returns:
        The path (not created here).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dni_rnn"


def env_data_dir() -> Path | None:
    """$DNI_RNN_DATA_DIR as a path, or None when unset or empty."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


def find_files(root: Path, names: Sequence[str], subdir: str) -> Path | None:
    """The folder, ``root`` itself or ``root/subdir``, that holds every one of ``names``.

    Args:
        root: a data directory.
        names: file names that must all be present.
        subdir: the corpus's subdirectory name (e.g. "ptb").

    Returns:
        The folder holding all the files, or None.
    """
    for folder in (root, root / subdir):
        if all((folder / n).is_file() for n in names):
            return folder
    return None


def missing_files(root: Path, names: Sequence[str], subdir: str) -> list[str]:
    """Which of ``names`` are absent from the better-stocked of ``root`` and ``root/subdir``."""
    best: list[str] | None = None
    for folder in (root, root / subdir):
        missing = [n for n in names if not (folder / n).is_file()]
        if best is None or len(missing) < len(best):
            best = missing
    return best or []


def existing_dir(data_dir) -> Path:
    """`data_dir` as a Path; a one-line CorpusError if it is not a directory."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise CorpusError(f"data directory not found: {root}")
    return root


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file so that readers see either the old file or the complete new one.

    The temporary file is fsync'ed before the rename, so a crash right after leaves the
    complete new file, not an empty one.

    Args:
        path: the destination.
        write: called with a temporary path in the same folder; it must create that file
            (it is removed first, so a hard link may be made there).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def describe(paths: Iterable[Path]) -> str:
    """Comma-separated paths for one-line messages."""
    return ", ".join(str(p) for p in paths)
