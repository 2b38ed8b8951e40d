"""Vocabulary: ordering, unknown tokens, state dicts, equality and mismatch messages."""

import pytest

from corpora import CorpusError, Vocabulary, VocabularyMismatch


def test_from_counts_orders_specials_then_frequency():
    v = Vocabulary.from_counts(["a", "<eos>", "b", "<unk>", "c"], [1, 5, 3, 2, 3])
    assert v.itos == ["<eos>", "<unk>", "b", "c", "a"]  # b, c tie: first seen first
    assert (v.eos, v.unk, len(v)) == (0, 1, 5)


def test_pruning_adds_unk():
    v = Vocabulary.from_counts(["<eos>", "a", "b", "c"], [9, 4, 2, 1], max_size=3)
    assert v.itos == ["<eos>", "<unk>", "a"] and v.encode(["a", "b", "zzz"]) == [2, 1, 1]
    v = Vocabulary.from_counts(["<eos>", "a", "b", "c"], [9, 4, 2, 1], min_freq=2)
    assert v.itos == ["<eos>", "<unk>", "a", "b"]


def test_reserve_unk_adds_it_once_after_eos():
    v = Vocabulary.from_counts(["<eos>", "a", "b"], [9, 4, 2], reserve_unk=True)
    assert v.itos == ["<eos>", "<unk>", "a", "b"] and v.encode(["b", "zzz"]) == [3, 1]
    v = Vocabulary.from_counts(["<eos>", "a", "<unk>"], [9, 1, 4], reserve_unk=True)
    assert v.itos == ["<eos>", "<unk>", "a"]  # the text's own <unk>: same place, no copy
    assert Vocabulary.from_counts(["<eos>", "a"], [9, 4]).itos == ["<eos>", "a"]  # default: none


def test_encode_decode_and_unknown_without_unk():
    v = Vocabulary(["<eos>", "x", "y"])
    assert v.unk is None and v.encode(["y", "x", "<eos>"]) == [2, 1, 0]
    assert v.decode([2, 1, 0]) == ["y", "x", "<eos>"]
    with pytest.raises(CorpusError, match=r"token 'q' in valid\.txt is not in the vocabulary"):
        v.encode(["x", "q"], source="valid.txt")


def test_state_dict_is_plain_and_round_trips():
    v = Vocabulary(["<eos>", "<unk>", "a"])
    sd = v.state_dict()
    assert sd == {"version": 1, "tokens": ["<eos>", "<unk>", "a"], "eos": "<eos>", "unk": "<unk>"}
    assert Vocabulary.from_state_dict(sd) == v
    with pytest.raises(CorpusError, match="not a vocabulary state dict"):
        Vocabulary.from_state_dict({"tokens": []})


def test_equality_and_mismatch_messages():
    a = Vocabulary(["<eos>", "<unk>", "a", "b"])
    assert a == Vocabulary(["<eos>", "<unk>", "a", "b"]) and a.digest() == Vocabulary(a.itos).digest()
    a.check_same(Vocabulary(["<eos>", "<unk>", "a", "b"]))
    with pytest.raises(VocabularyMismatch, match="checkpoint has 3 tokens, the corpus has 4"):
        a.check_same(Vocabulary(["<eos>", "a", "b"]))
    with pytest.raises(VocabularyMismatch, match="id 2 is 'b' in the checkpoint but 'a' in the corpus"):
        a.check_same(Vocabulary(["<eos>", "<unk>", "b", "a"]))
    no_unk = Vocabulary(["<eos>", "<unk>", "a", "b"], unk=None)
    assert a != no_unk
    with pytest.raises(CorpusError, match="special tokens differ"):
        a.check_same(no_unk)


def test_bad_construction():
    with pytest.raises(CorpusError, match="twice"):
        Vocabulary(["<eos>", "a", "a"])
    with pytest.raises(CorpusError, match="lacks its end-of-line token"):
        Vocabulary(["a"])
