"""The cache of tokenised corpora: ``<cache>/tensors/<kind>-<key>.pt``.

The key is a hash of everything the ids depend on: the source files' md5 sums (or a
dataset's fingerprint), the tokenizer and its settings, the vocabulary options and
``FORMAT``. Entries hold only tensors and plain Python values and are read with
``torch.load(weights_only=True)``; they are written atomically, so concurrent loaders
(e.g. DDP ranks) never see half a file. A damaged entry is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .paths import atomic_write

FORMAT = 2  # bump when the tokenisation or the entry layout changes (2: text reserves <unk>)


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of JSON-serialisable ``parts``."""
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def entry_path(root: Path, kind: str, key: str) -> Path:
    """The file that holds the entry ``kind``/``key`` under cache root ``root``."""
    return root / "tensors" / f"{kind}-{key}.pt"


def load_entry(path: Path) -> dict | None:
    """Read a cache entry, or None if it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged entry is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable cache entry {path}: {e}", stacklevel=2)
        return None


def save_entry(path: Path, entry: dict) -> bool:
    """Write a cache entry atomically; warn (do not fail) if the cache is not writable.

    Returns:
        True when written.
    """
    try:
        atomic_write(path, lambda tmp: torch.save(entry, tmp))
        return True
    except OSError as e:
        warnings.warn(f"could not write cache entry {path}: {e}", stacklevel=2)
        return False
