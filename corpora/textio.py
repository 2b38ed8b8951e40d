"""Reading text files with errors that name the file, and cutting text into lines.

Line rule (the one that gives Mikolov's PTB counts): every newline-terminated line is a
line, blank ones included (each gets one ``<eos>`` later); a last piece after the final
newline is a line only if it holds something other than whitespace (the PTB char files
end with a lone space after their last newline).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CorpusError


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The whole text of a file, with one-line CorpusErrors for the usual problems.

    Args:
        path: the file.
        encoding: its text encoding.

    Returns:
        The decoded text.

    Raises:
        CorpusError: the file is missing, a directory, unreadable, empty, or not valid
            ``encoding`` (the message gives the byte offset and line; nothing is replaced
            or skipped silently).
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"text file not found: {path}")
    if path.is_dir():
        raise CorpusError(f"expected a text file but found a directory: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror or e}") from e
    if not raw.strip():
        raise CorpusError(f"text file is empty: {path}")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise CorpusError(
            f"{path} is not valid {encoding} text (byte {e.start}, line {line}: "
            f"{raw[e.start:e.start + 1]!r}); convert it to {encoding} or pass encoding="
        ) from e
    except LookupError as e:
        raise CorpusError(f"unknown text encoding {encoding!r} for {path}") from e


def split_lines(text: str) -> list[str]:
    """Cut text into lines by the rule in this module's docstring (newlines removed)."""
    lines = text.split("\n")
    if not lines[-1].strip():
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]
