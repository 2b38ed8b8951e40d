"""The cache of tokenised corpora: ``<cache>/tensors/<kind>-<key>.pt``.

The key is a hash of everything the ids depend on: the source files' md5 sums (or a
dataset's fingerprint), the tokenizer and its settings, the vocabulary options and
``FORMAT``. Entries hold only tensors and plain Python values and are read with
``torch.load(weights_only=True)``; they are written atomically, so concurrent loaders
(e.g. DDP ranks) never see half a file. Each entry carries a sha256 of its contents: a
damaged entry (one that no longer loads, or one whose ids changed) is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .paths import atomic_write

FORMAT = 3  # bump when the tokenisation or the entry layout changes (2: text reserves
# <unk>; 3: entries carry a sha256 of their contents)


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of JSON-serialisable ``parts``."""
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def entry_path(root: Path, kind: str, key: str) -> Path:
    """The file that holds the entry ``kind``/``key`` under cache root ``root``."""
    return root / "tensors" / f"{kind}-{key}.pt"


def load_entry(path: Path) -> dict | None:
    """Read a cache entry, or None if it is absent, unreadable or fails its checksum."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        entry, digest = stored["entry"], stored["sha256"]
    except Exception as e:  # a damaged entry is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable cache entry {path}: {e}", stacklevel=2)
        return None
    if digest != _digest(entry):  # a flipped byte can leave a file that still loads
        warnings.warn(f"ignoring damaged cache entry {path}: its contents do not match their "
                      "checksum (rebuilt)", stacklevel=2)
        return None
    return entry


def _digest(entry) -> str:
    """sha256 of an entry's tensors (dtype, shape, bytes) and plain values, in key order."""
    h = hashlib.sha256()

    def add(x):
        if isinstance(x, torch.Tensor):
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                add(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"[{len(x)}".encode())
            for v in x:
                add(v)
        else:
            h.update(repr(x).encode())

    add(entry)
    return h.hexdigest()


def save_entry(path: Path, entry: dict) -> bool:
    """Write a cache entry atomically; warn (do not fail) if the cache is not writable.

    Returns:
        True when written.
    """
    try:
        stored = {"entry": entry, "sha256": _digest(entry)}
        atomic_write(path, lambda tmp: torch.save(stored, tmp))
        return True
    except OSError as e:
        warnings.warn(f"could not write cache entry {path}: {e}", stacklevel=2)
        return False
