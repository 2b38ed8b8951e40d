"""Optional dependencies: Hugging Face datasets (offline, local files), sentencepiece, lazy imports."""

import random
import subprocess
import sys

import pytest
import torch

from corpora import CorpusError, load_hf, load_text_files, load_wikitext


@pytest.fixture
def splits(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    (d / "train.txt").write_text("the cat sat\non the mat\n\nthe <unk> end\n")
    (d / "valid.txt").write_text("the cat\nmat dog\n")
    (d / "test.txt").write_text("on the cat\n")
    return d


def test_import_is_light():
    code = ("import sys, corpora, dni_rnn; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('datasets', 'sentencepiece', 'pyarrow', 'huggingface_hub')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_install_hints_when_missing(monkeypatch, splits):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(CorpusError, match=r'pip install "dni-rnn\[hf\]"'):
        load_hf("text", data_files={"train": str(splits / "train.txt")})
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(CorpusError, match=r'pip install "dni-rnn\[sentencepiece\]"'):
        load_text_files(splits / "train.txt", tokenizer="sentencepiece")


def test_hf_text_offline_matches_local_loader(splits):
    pytest.importorskip("datasets")
    files = {"train": str(splits / "train.txt"), "validation": str(splits / "valid.txt"),
             "test": str(splits / "test.txt")}
    c = load_hf("text", data_files=files, documents="row")
    local = load_text_files(splits / "train.txt", splits / "valid.txt", splits / "test.txt",
                            documents="line")
    assert c.name == "text" and c.vocab == local.vocab
    for s in ("train", "valid", "test"):
        assert torch.equal(c.split(s), local.split(s))
        assert torch.equal(c.doc_starts[s], local.doc_starts[s])
    # the blank line is a lone <eos>; 'dog' is unseen and becomes <unk>
    assert c.train.tolist() == [2, 3, 4, 0, 5, 2, 6, 0, 0, 2, 1, 7, 0]
    assert c.valid.tolist() == [2, 3, 0, 6, 1, 0]
    assert c.info["cache"] == "miss"
    again = load_hf("text", data_files=files, documents="row")
    assert again.info["cache"] == "hit" and torch.equal(again.train, c.train)


def test_hf_errors(splits):
    pytest.importorskip("datasets")
    with pytest.raises(CorpusError, match="has no valid split .*split_names"):
        load_hf("text", data_files={"train": str(splits / "train.txt")})
    c = load_hf("text", data_files={"train": str(splits / "train.txt")},
                split_names={"valid": None, "test": None})
    assert c.valid.numel() == 0 and c.train.numel() == 13
    with pytest.raises(CorpusError, match="no column 'body'"):
        load_hf("text", data_files={"train": str(splits / "train.txt")}, text_field="body",
                split_names={"valid": None, "test": None})
    with pytest.raises(CorpusError, match="could not load Hugging Face dataset no-such/dataset"):
        load_hf("no-such/dataset")


def test_wikitext_from_local_files(tmp_path, monkeypatch):
    d = tmp_path / "data" / "wikitext-2"
    d.mkdir(parents=True)
    for split, text in (("train", " = A = \n \n a b <unk> \n"), ("valid", " a b \n"), ("test", " c \n")):
        (d / f"wiki.{split}.tokens").write_text(text)
    monkeypatch.setenv("DNI_RNN_DATA_DIR", str(tmp_path / "data"))
    c = load_wikitext("2")
    assert c.name == "wikitext-2" and c.train.numel() == 9 and c.test.tolist() == [c.vocab.unk, 0]
    with pytest.raises(CorpusError, match="WikiText-103 files missing in"):
        load_wikitext("103", data_dir=tmp_path / "data")


def test_wikitext_offline_error(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("DNI_RNN_DATA_DIR", str(tmp_path))
    with pytest.raises(CorpusError, match="WikiText-2 not found locally .*offline") as e:
        load_wikitext("2")
    assert "\n" not in str(e.value)


def _greek_file(path, lines, seed):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "\n"
                            for _ in range(lines)))
    return path


def test_sentencepiece_train_encode_decode_and_cache(tmp_path):
    pytest.importorskip("sentencepiece")
    train = _greek_file(tmp_path / "train.txt", 300, 0)
    valid = _greek_file(tmp_path / "valid.txt", 20, 1)
    test = tmp_path / "test.txt"
    test.write_text("alpha beta\nomega ψ\n")
    for model_type in ("unigram", "bpe"):
        c = load_text_files(train, valid, test, tokenizer="sentencepiece", sp_vocab_size=26,
                            sp_model_type=model_type)
        assert len(c.vocab) == 26 and c.vocab.itos[:2] == ["<unk>", "<eos>"]
        assert (c.vocab.unk, c.vocab.eos) == (0, 1)
        assert c.decode(c.valid) == valid.read_text()          # round trip
        assert c.tokenizer.decode(c.tokenizer.encode("gamma delta")) == "gamma delta"
        ids = c.tokenizer.encode("alpha")                      # corpus ids are sentencepiece ids
        assert "".join(c.vocab.decode(ids)) == "▁alpha" and c.vocab.encode(c.tokenizer.tokenize("alpha")) == ids
        assert 0 in c.test.tolist()                             # ψ is unknown
        models = list((tmp_path / "cache" / "dni_rnn" / "sentencepiece").glob("*.model"))
        again = load_text_files(train, valid, test, tokenizer="sentencepiece", sp_vocab_size=26,
                                sp_model_type=model_type)
        assert again.info["cache"] == "hit" and torch.equal(again.train, c.train)
        assert again.decode(again.valid) == valid.read_text()
        assert list((tmp_path / "cache" / "dni_rnn" / "sentencepiece").glob("*.model")) == models
    assert len(models) == 2  # one model per setting
    with pytest.raises(CorpusError, match="sentencepiece training failed .*vocab_size=500"):
        load_text_files(train, tokenizer="sentencepiece", sp_vocab_size=500)


def test_hf_sentencepiece_and_changed_local_file(tmp_path):
    pytest.importorskip("datasets")
    pytest.importorskip("sentencepiece")
    train = _greek_file(tmp_path / "train.txt", 200, 2)
    files = {"train": str(train)}
    none = {"valid": None, "test": None}
    c = load_hf("text", data_files=files, split_names=none, tokenizer="sentencepiece",
                sp_vocab_size=24)
    assert len(c.vocab) == 24 and c.decode(c.train) == train.read_text()
    _greek_file(train, 200, 3)  # new content: neither the model nor the ids may be reused
    d = load_hf("text", data_files=files, split_names=none, tokenizer="sentencepiece",
                sp_vocab_size=24)
    assert d.info["cache"] == "miss" and d.decode(d.train) == train.read_text()
