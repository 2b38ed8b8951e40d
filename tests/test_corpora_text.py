"""Local text files: word/char levels, document masks, the cache, and the errors users meet."""

import pytest
import torch

from corpora import CorpusError, load_text_files


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    (d / "train.txt").write_text("the cat sat\non the mat\n")
    (d / "valid.txt").write_text("the cat\n")
    (d / "test.txt").write_text("a dog\n")
    return d


def test_word_level_ids(files):
    c = load_text_files(files / "train.txt", files / "valid.txt")
    # <eos> 0; <unk> 1, reserved; then by count: the(2), then first seen: cat sat on mat
    assert c.vocab.itos == ["<eos>", "<unk>", "the", "cat", "sat", "on", "mat"]
    assert c.train.tolist() == [2, 3, 4, 0, 5, 2, 6, 0]
    assert c.valid.tolist() == [2, 3, 0]
    assert c.decode(c.train) == "the cat sat\non the mat\n"


def test_unseen_words_become_unk_and_are_counted(files):
    (files / "valid.txt").write_text("the zebra cat\nzebra\n")
    c = load_text_files(files / "train.txt", files / "valid.txt", files / "test.txt")
    assert c.vocab.unk == 1 and len(c.vocab) == 7  # the training types, <eos> and <unk>
    assert c.vocab.decode(c.valid) == ["the", "<unk>", "cat", "<eos>", "<unk>", "<eos>"]
    assert c.test.tolist() == [1, 1, 0]  # "a dog"
    assert c.info["unk"] == {"train": 0, "valid": 2, "test": 2}
    again = load_text_files(files / "train.txt", files / "valid.txt", files / "test.txt")
    assert again.info["cache"] == "hit" and again.info["unk"] == c.info["unk"]


def test_rare_training_words_become_unk(files):
    c = load_text_files(files / "train.txt", files / "valid.txt", min_freq=2)
    assert c.vocab.itos == ["<eos>", "<unk>", "the"]
    assert c.info["unk"] == {"train": 4, "valid": 1, "test": 0}  # cat sat on mat; cat


def test_unknown_token_without_unk_names_token_file_line_and_types(files):
    with pytest.raises(CorpusError, match=r"token 'a' in .*test\.txt line 1 is not in the training "
                                          r"vocabulary \(6 types\), which has no '<unk>'"):
        load_text_files(files / "train.txt", files / "valid.txt", files / "test.txt", unk=None)


def test_unknown_token_maps_to_unk_when_train_has_one(files):
    (files / "train.txt").write_text("the <unk> sat\n")
    c = load_text_files(files / "train.txt", test=files / "test.txt")
    assert c.vocab.unk == 1 and c.test.tolist() == [1, 1, 0] and len(c.valid) == 0


def test_char_level(files):
    (files / "train.txt").write_text("  ab  c \nb\n")
    c = load_text_files(files / "train.txt", tokenizer="char")
    assert c.vocab.decode(c.train) == ["a", "b", "_", "c", "<eos>", "b", "<eos>"]
    assert c.decode(c.train) == "ab c\nb\n"


def test_unseen_character_becomes_unk(files):
    (files / "train.txt").write_text("ab\n")
    (files / "valid.txt").write_text("abz\n")
    c = load_text_files(files / "train.txt", files / "valid.txt", tokenizer="char")
    assert c.vocab.itos == ["<eos>", "<unk>", "a", "b"]
    assert c.vocab.decode(c.valid) == ["a", "b", "<unk>", "<eos>"]
    assert c.info["unk"]["valid"] == 1


def test_blank_lines_are_one_eos_each(files):
    (files / "train.txt").write_text("a b\n\n  \nc\n")
    c = load_text_files(files / "train.txt", documents="line")
    assert c.vocab.decode(c.train) == ["a", "b", "<eos>", "<eos>", "<eos>", "c", "<eos>"]
    # each blank line is a document of one <eos>
    assert c.doc_starts["train"].tolist() == [True, False, False, True, True, True, False]
    c = load_text_files(files / "train.txt", tokenizer="char")
    assert c.vocab.decode(c.train) == ["a", "_", "b", "<eos>", "<eos>", "<eos>", "c", "<eos>"]


def test_documents_per_file_and_per_line(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "01.txt").write_text("a b\nc\n")
    (d / "02.txt").write_text("d\n")
    c = load_text_files(d, documents="file")  # a directory: its files, sorted
    assert c.train.numel() == 7
    assert c.doc_starts["train"].tolist() == [True, False, False, False, False, True, False]
    assert c.doc_starts["valid"].numel() == 0
    c = load_text_files(str(d / "*.txt"), documents="line")  # a glob
    assert c.doc_starts["train"].tolist() == [True, False, False, True, False, True, False]


def test_cache_entries_of_another_format_are_not_served(files, monkeypatch):
    from corpora import cache

    with monkeypatch.context() as m:  # as written before text corpora reserved <unk>
        m.setattr(cache, "FORMAT", cache.FORMAT - 1)
        old = load_text_files(files / "train.txt", files / "valid.txt")
    new = load_text_files(files / "train.txt", files / "valid.txt")
    assert (old.info["cache"], new.info["cache"]) == ("miss", "miss")


def test_cache_hit_is_identical(files):
    (files / "test.txt").write_text("the mat\n")
    a = load_text_files(files / "train.txt", files / "valid.txt", files / "test.txt", documents="line")
    b = load_text_files(files / "train.txt", files / "valid.txt", files / "test.txt", documents="line")
    assert (a.info["cache"], b.info["cache"]) == ("miss", "hit")
    for s in ("train", "valid", "test"):
        assert torch.equal(a.split(s), b.split(s)) and b.split(s).dtype == torch.int64
        assert torch.equal(a.doc_starts[s], b.doc_starts[s])
    assert a.vocab == b.vocab
    # a change to a file is a different key
    (files / "train.txt").write_text("the cat sat\non the mat\nmat\n")
    c = load_text_files(files / "train.txt", files / "valid.txt", files / "test.txt", documents="line")
    assert c.info["cache"] == "miss" and c.train.numel() == 10


def test_missing_directory_and_file(tmp_path, files):
    with pytest.raises(CorpusError, match="train: directory not found: .*nowhere"):
        load_text_files(tmp_path / "nowhere" / "train.txt")
    with pytest.raises(CorpusError, match="valid: text file not found: .*nothing.txt"):
        load_text_files(files / "train.txt", files / "nothing.txt")


def test_empty_file(files):
    (files / "valid.txt").write_text(" \n\n")
    with pytest.raises(CorpusError, match=r"^valid: text file is empty: .*valid\.txt$"):
        load_text_files(files / "train.txt", files / "valid.txt")


def test_invalid_utf8_names_the_split_file_byte_and_line(files):
    (files / "train.txt").write_bytes(b"good line\nbad \xff\xfe line\n")
    with pytest.raises(CorpusError, match=r"^train: .*train\.txt is not valid utf-8 text "
                                          r"\(byte 14, line 2: b'\\xff'\)"):
        load_text_files(files / "train.txt")
    c = load_text_files(files / "train.txt", encoding="latin-1")
    assert c.vocab.itos == ["<eos>", "<unk>", "line", "good", "bad", "\xff\xfe"]


def test_bad_options(files):
    with pytest.raises(CorpusError, match="unknown tokenizer 'bytes'"):
        load_text_files(files / "train.txt", tokenizer="bytes")
    with pytest.raises(CorpusError, match="documents must be"):
        load_text_files(files / "train.txt", documents="para")
