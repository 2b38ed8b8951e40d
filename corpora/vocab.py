"""The vocabulary: tokens <-> ids, with ``<eos>`` and (where the corpus has one) ``<unk>``.

Built from the training split only. Ids are ordered: ``<eos>`` first, then ``<unk>`` if
present (in the training text, or reserved), then the other tokens by decreasing training
frequency (ties: first appearance), so a frequency-sorted softmax (adaptive softmax) needs
no remapping.

``state_dict()`` holds only lists, str and int, so it can live inside a checkpoint loaded
with ``torch.load(weights_only=True)``; evaluation rebuilds the same ids with
``Vocabulary.from_state_dict``.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

from .errors import CorpusError, VocabularyMismatch

EOS = "<eos>"
UNK = "<unk>"


class Vocabulary:
    """An ordered token list and its inverse.

    Args:
        tokens: the tokens in id order (no duplicates).
        eos: the end-of-line token; it must be among ``tokens`` (or None for none).
        unk: the unknown-token symbol; its id is used for unseen tokens only if it is
            among ``tokens``, otherwise unseen tokens are an error.
    """

    def __init__(self, tokens: Sequence[str], eos: str | None = EOS, unk: str | None = UNK):
        self.itos: list[str] = list(tokens)
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            seen: set[str] = set()
            dup = next(t for t in self.itos if t in seen or seen.add(t))
            raise CorpusError(f"vocabulary lists token {dup!r} twice")
        if eos is not None and eos not in self.stoi:
            raise CorpusError(f"vocabulary lacks its end-of-line token {eos!r}")
        self.eos_token = eos
        self.unk_token = unk

    # ids of the special tokens
    @property
    def eos(self) -> int | None:
        """Id of ``<eos>`` (None if the vocabulary has no end-of-line token)."""
        return None if self.eos_token is None else self.stoi[self.eos_token]

    @property
    def unk(self) -> int | None:
        """Id of ``<unk>``, or None where the corpus has no unknown-token symbol."""
        return self.stoi.get(self.unk_token) if self.unk_token is not None else None

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __getitem__(self, token: str) -> int:
        return self.stoi[token]

    def __iter__(self):
        return iter(self.itos)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, eos={self.eos}, unk={self.unk})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return (self.itos == other.itos and self.eos_token == other.eos_token
                and self.unk == other.unk)

    __hash__ = None  # mutable-looking container: no hashing

    def encode(self, tokens: Iterable[str], source: str | None = None) -> list[int]:
        """Map tokens to ids.

        Args:
            tokens: the tokens.
            source: where they came from, for the error message (e.g. a file name).

        Returns:
            The ids; unseen tokens become ``unk`` where the vocabulary has one.

        Raises:
            CorpusError: a token is unseen and there is no ``<unk>``.
        """
        stoi, unk = self.stoi, self.unk
        if unk is not None:
            return [stoi.get(t, unk) for t in tokens]
        tokens = list(tokens)
        try:
            return [stoi[t] for t in tokens]
        except KeyError as e:
            where = f" in {source}" if source else ""
            raise CorpusError(
                f"token {e.args[0]!r}{where} is not in the vocabulary, which has no "
                f"{self.unk_token or UNK!r} to map it to"
            ) from None

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Map ids (ints or a 1-D tensor) back to tokens."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        itos = self.itos
        return [itos[i] for i in ids]

    def digest(self) -> str:
        """A short hash of the token list and specials (for logs and file names)."""
        h = hashlib.sha1("\n".join(self.itos).encode())
        h.update(f"\0{self.eos_token}\0{self.unk_token if self.unk is not None else ''}".encode())
        return h.hexdigest()[:12]

    def state_dict(self) -> dict:
        """Plain values only (lists, str, int, None): safe for ``weights_only=True``."""
        return {"version": 1, "tokens": list(self.itos), "eos": self.eos_token,
                "unk": self.unk_token}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocabulary":
        """Rebuild a vocabulary saved with ``state_dict()``."""
        try:
            return cls(state["tokens"], eos=state["eos"], unk=state["unk"])
        except (KeyError, TypeError) as e:
            raise CorpusError(f"not a vocabulary state dict (missing {e})") from None

    def check_same(self, other: "Vocabulary", what: str = "checkpoint") -> None:
        """Raise VocabularyMismatch, naming the first difference, unless equal.

        Args:
            other: the vocabulary to compare with (e.g. the checkpoint's).
            what: what ``other`` belongs to, for the message.
        """
        if self == other:
            return
        if len(self) != len(other):
            detail = f"{what} has {len(other)} tokens, the corpus has {len(self)}"
        else:
            i = next((i for i, (a, b) in enumerate(zip(self.itos, other.itos)) if a != b), None)
            if i is not None:
                detail = (f"id {i} is {other.itos[i]!r} in the {what} but {self.itos[i]!r} "
                          f"in the corpus")
            else:
                def specials(v: Vocabulary) -> str:
                    unk = v.unk_token if v.unk is not None else None
                    return f"eos={v.eos_token!r} unk={unk!r}"

                detail = f"special tokens differ: {what} {specials(other)}, corpus {specials(self)}"
        raise VocabularyMismatch(f"vocabulary mismatch: {detail}")

    @classmethod
    def from_counts(cls, first_seen: Sequence[str], counts: Sequence[int], *, eos: str | None = EOS,
                    unk: str | None = UNK, max_size: int | None = None,
                    min_freq: int = 1, reserve_unk: bool = False) -> "Vocabulary":
        """Order tokens as this module describes, optionally pruning rare ones.

        Args:
            first_seen: every training token type, in order of first appearance.
            counts: their training counts, aligned with ``first_seen``.
            eos: the end-of-line token (kept whatever its count).
            unk: the unknown-token symbol; added when pruning drops tokens.
            max_size: keep at most this many tokens (specials included), or None.
            min_freq: drop tokens seen fewer times than this.
            reserve_unk: add ``unk`` even when nothing is pruned, so that held-out
                tokens the training text lacks have an id.

        Returns:
            The vocabulary.
        """
        specials = [t for t in (eos, unk) if t is not None and t in set(first_seen)]
        # sorted() is stable: equal counts keep their order of first appearance
        order = sorted(range(len(first_seen)), key=lambda i: -counts[i])
        rest = [first_seen[i] for i in order
                if first_seen[i] not in specials and counts[i] >= min_freq]
        pruned = len(rest) + len(specials) < len(first_seen)
        if max_size is not None:
            room = max_size - len(specials) - (1 if unk is not None and unk not in specials else 0)
            if len(rest) > room:
                rest, pruned = rest[:max(room, 0)], True
        if pruned and unk is None:
            raise CorpusError("pruning the vocabulary (max_size/min_freq) needs an unk token")
        if (pruned or reserve_unk) and unk is not None and unk not in specials:
            specials.append(unk)
        return cls(specials + rest, eos=eos, unk=unk)
