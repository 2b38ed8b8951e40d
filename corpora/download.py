"""Downloading data files into the cache: a progress bar, a timeout, md5 checks, atomic writes.

A *source* is a URL string of one of two kinds:

- a base URL ending in ``/``: each file is fetched as ``base + name``;
- an archive URL ending in ``.tgz`` / ``.tar.gz``: fetched once, and each wanted file is
  taken from the member whose path ends with ``/name`` (e.g. Mikolov's simple-examples.tgz
  holds ``./simple-examples/data/ptb.train.txt``).

Every file is checked against its md5 before it is moved into place, so the cache never
holds a partial or wrong file.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

from tqdm import tqdm

from .paths import atomic_write

_CHUNK = 1 << 16
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz")


def _stream(url: str, out, timeout: float, progress: bool, desc: str) -> str:
    """Copy ``url`` into the open binary file ``out``; return the md5 of what was written."""

    h = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        total = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
        total = int(total) if total and str(total).isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress,
                  leave=False) as bar:
            for block in iter(lambda: resp.read(_CHUNK), b""):
                out.write(block)
                h.update(block)
                bar.update(len(block))
    return h.hexdigest()


def fetch_file(url: str, dest: Path, md5: str | None, *, timeout: float = 20.0,
               progress: bool = True) -> None:
    """Download one file to ``dest`` (atomically), checking its md5.

    Args:
        url: where to get it.
        dest: the final path.
        md5: the expected md5 hex digest, or None to skip the check.
        timeout: seconds for the connection and each read.
        progress: show a tqdm progress bar.

    Raises:
        OSError (urllib's URLError included) on a network failure; ValueError on a bad md5.
    """
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            got = _stream(url, out, timeout, progress, dest.name)
        if md5 is not None and got != md5:
            raise ValueError(f"{url} gave md5 {got}, expected {md5}")

    atomic_write(dest, write)


def _from_archive(url: str, wanted: Mapping[str, str | None], dest_dir: Path, *,
                  timeout: float, progress: bool) -> list[str]:
    """Fetch an archive and extract the wanted files; return the names it yielded."""
    got: list[str] = []
    errors: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        _stream(url, tmp, timeout, progress, url.rsplit("/", 1)[-1])
        tmp.seek(0)
        with tarfile.open(fileobj=tmp, mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                if name not in wanted or name in got:
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue

                def write(t: Path, src=src, name=name) -> None:
                    h = hashlib.md5()
                    with open(t, "wb") as out:
                        for block in iter(lambda: src.read(_CHUNK), b""):
                            out.write(block)
                            h.update(block)
                    if wanted[name] is not None and h.hexdigest() != wanted[name]:
                        raise ValueError(f"{name} in {url} has md5 {h.hexdigest()}, "
                                         f"expected {wanted[name]}")

                try:
                    atomic_write(dest_dir / name, write)
                except ValueError as e:  # a same-named member with other content: keep looking
                    errors.append(str(e))
                    continue
                got.append(name)
    if errors and len(got) < len(wanted):
        raise ValueError("; ".join(errors))
    return got


def fetch_all(files: Mapping[str, str | None], dest_dir: Path, sources: Sequence[str], *,
              timeout: float = 20.0, progress: bool = True) -> tuple[list[str], list[str]]:
    """Fetch every file in ``files`` that ``dest_dir`` lacks, trying sources in order.

    Args:
        files: file name -> expected md5 (or None).
        dest_dir: the folder to fill (created if needed).
        sources: base URLs (ending in "/") and archive URLs (ending in .tgz / .tar.gz).
        timeout: seconds for each connection and read.
        progress: show progress bars.

    Returns:
        (names still missing, one short reason per failed attempt).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    missing = [n for n in files if not (dest_dir / n).is_file()]
    reasons: list[str] = []
    for source in sources:
        if not missing:
            break
        try:
            if source.endswith(ARCHIVE_SUFFIXES):
                done = _from_archive(source, {n: files[n] for n in missing}, dest_dir,
                                     timeout=timeout, progress=progress)
                missing = [n for n in missing if n not in done]
                continue
            for name in list(missing):
                fetch_file(source + name, dest_dir / name, files[name], timeout=timeout,
                           progress=progress)
                missing.remove(name)
        except (OSError, ValueError, tarfile.TarError, shutil.Error) as e:
            reasons.append(f"{source}: {_reason(e)}")
        missing = [n for n in missing if not (dest_dir / n).is_file()]
    return missing, reasons


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    text = str(reason if reason is not None else e) or type(e).__name__
    return " ".join(text.split())
