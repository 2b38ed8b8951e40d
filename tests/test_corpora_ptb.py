"""Penn Treebank: exact counts, loading order, md5 checks, download paths, the tensor cache."""

import shutil
import tarfile
import time

import pytest
import torch

import corpora
from corpora import CorpusError, load_ptb
from corpora.ptb import PTB_FILES

WORD = PTB_FILES["word"]


def copy_files(src, dst, names):
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copyfile(src / n, dst / n)
    return dst


@pytest.fixture
def no_env_data(monkeypatch):
    monkeypatch.delenv("DNI_RNN_DATA_DIR", raising=False)


def test_word_counts_vocab_and_cache_hit(ptb_dir):
    c = load_ptb("word", data_dir=ptb_dir, progress=False)
    assert (len(c.train), len(c.valid), len(c.test)) == (929_589, 73_760, 82_430)
    assert len(c.vocab) == 10_000
    assert c.vocab.eos == 0 and c.vocab.unk == 1 and c.vocab.itos[:4] == ["<eos>", "<unk>", "the", "N"]
    assert c.train.dtype == torch.int64 and c.doc_starts is None
    # one <eos> per line: 42,068 / 3,370 / 3,761 lines
    assert [int((s == c.vocab.eos).sum()) for s in (c.train, c.valid, c.test)] == [42_068, 3_370, 3_761]
    assert int((c.train == c.vocab.unk).sum()) == 45_020
    assert c.decode(c.valid[:15]) == "consumers may want to move their telephones a little closer to the tv set\n"
    assert c.info["cache"] == "miss"
    again = load_ptb("word", data_dir=ptb_dir)
    assert again.info["cache"] == "hit"
    for s in ("train", "valid", "test"):
        assert torch.equal(getattr(again, s), getattr(c, s))
    assert again.vocab == c.vocab


def test_char_counts_and_cache_hit(ptb_dir):
    c = load_ptb("char", data_dir=ptb_dir)
    assert (len(c.train), len(c.valid), len(c.test)) == (5_017_482, 393_042, 442_423)
    assert len(c.vocab) == 50 and c.vocab.eos == 0
    assert c.vocab.unk is None and "_" in c.vocab and "<unk>" not in c.vocab
    assert c.decode(c.valid[:20]) == "consumers may want t"
    again = load_ptb("char", data_dir=ptb_dir)
    assert again.info["cache"] == "hit" and torch.equal(again.train, c.train)
    assert torch.equal(again.test, c.test) and again.vocab == c.vocab


def test_char_level_of_word_files_equals_char_files(ptb_dir, tmp_path):
    # README: each char line is ' '.join(word_line.strip().replace(' ', '_'))
    by_char = corpora.load_text_files(ptb_dir / "ptb.valid.txt", tokenizer="char")
    char_files = corpora.load_text_files(ptb_dir / "ptb.char.valid.txt", tokenizer="word")
    assert by_char.vocab.decode(by_char.train) == char_files.vocab.decode(char_files.train)


def test_data_root_with_ptb_subdir_and_env_var(ptb_dir, monkeypatch):
    root = ptb_dir.parent
    c = load_ptb("word", data_dir=root)  # --data-dir ../shared/data works as well as .../ptb
    assert c.info["folder"] == str(ptb_dir)
    monkeypatch.setenv("DNI_RNN_DATA_DIR", str(root))
    c = load_ptb("word", download=False)
    assert c.info["folder"] == str(ptb_dir) and len(c.valid) == 73_760


def test_corrupted_file_is_rejected(ptb_dir, tmp_path):
    d = copy_files(ptb_dir, tmp_path / "data", WORD)
    raw = bytearray((d / "ptb.valid.txt").read_bytes())
    raw[1000] ^= 0x01
    (d / "ptb.valid.txt").write_bytes(bytes(raw))
    with pytest.raises(CorpusError, match=r"ptb\.valid\.txt fails its md5 check .*expected "
                                          r"aa0affc06ff7c36e977d7cd49e3839bf") as e:
        load_ptb("word", data_dir=d)
    assert "\n" not in str(e.value)


def test_md5_is_remembered(ptb_dir, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    load_ptb("word", data_dir=ptb_dir, cache_dir=cache, use_cache=False)
    assert len(list((cache / "checksums").glob("*.json"))) == 3

    def boom(path):
        raise AssertionError(f"md5 recomputed for {path}")

    monkeypatch.setattr(corpora.checksums, "md5_of", boom)
    c = load_ptb("word", data_dir=ptb_dir, cache_dir=cache)
    assert len(c.test) == 82_430


def test_missing_directory(tmp_path):
    with pytest.raises(CorpusError, match="data directory not found: .*nope"):
        load_ptb("word", data_dir=tmp_path / "nope")


def test_explicit_dir_without_files_names_them(tmp_path):
    with pytest.raises(CorpusError, match=r"missing in .*ptb\.char\.train\.txt, ptb\.char\.valid\.txt"):
        load_ptb("char", data_dir=tmp_path)


def test_offline_failure_is_one_clear_line_and_fast(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("DNI_RNN_DATA_DIR", str(empty))
    with pytest.raises(CorpusError) as e:
        load_ptb("word", download=False)
    msg = str(e.value)
    assert "\n" not in msg and "missing ptb.train.txt, ptb.valid.txt, ptb.test.txt" in msg
    assert "DNI_RNN_DATA_DIR" in msg and "download=False" in msg
    t0 = time.perf_counter()
    unreachable = [(tmp_path / "no-mirror").as_uri() + "/", "http://127.0.0.1:9/",
                   (tmp_path / "no.tgz").as_uri()]
    with pytest.raises(CorpusError, match="download failed") as e:
        load_ptb("char", sources=unreachable, timeout=2, progress=False)
    assert time.perf_counter() - t0 < 10
    assert "\n" not in str(e.value) and "ptb.char.train.txt" in str(e.value)


def test_download_from_mirror_into_cache(ptb_dir, tmp_path, no_env_data):
    mirror = copy_files(ptb_dir, tmp_path / "mirror", WORD)
    cache = tmp_path / "c"
    c = load_ptb("word", cache_dir=cache, sources=[mirror.as_uri() + "/"], progress=False)
    assert c.info["folder"] == str(cache / "ptb") and len(c.train) == 929_589
    assert sorted(p.name for p in (cache / "ptb").iterdir()) == sorted(WORD)
    # next time the cache is found without any source
    assert len(load_ptb("word", cache_dir=cache, download=False).valid) == 73_760


def test_download_rejects_bad_md5(ptb_dir, tmp_path, no_env_data):
    mirror = copy_files(ptb_dir, tmp_path / "mirror", WORD)
    (mirror / "ptb.test.txt").write_text("not the test set\n")
    with pytest.raises(CorpusError, match="ptb.test.txt.*md5"):
        load_ptb("word", cache_dir=tmp_path / "c", sources=[mirror.as_uri() + "/"], progress=False)
    assert not (tmp_path / "c" / "ptb" / "ptb.test.txt").exists()


def test_download_from_archive(ptb_dir, tmp_path, no_env_data):
    tgz = tmp_path / "simple-examples.tgz"
    decoy = tmp_path / "decoy.txt"
    decoy.write_text("a same-named file with other content\n")
    with tarfile.open(tgz, "w:gz", compresslevel=1) as tar:
        tar.add(decoy, arcname="./simple-examples/1-basic/ptb.test.txt")  # skipped by md5
        for n in WORD:
            tar.add(ptb_dir / n, arcname=f"./simple-examples/data/{n}")
    cache = tmp_path / "c"
    c = load_ptb("word", cache_dir=cache, sources=[(tmp_path / "nothing").as_uri() + "/", tgz.as_uri()],
                 progress=False)
    assert len(c.test) == 82_430 and c.info["folder"] == str(cache / "ptb")


def test_unknown_level():
    with pytest.raises(CorpusError, match="'word' or 'char'"):
        load_ptb("byte")


def test_vocab_survives_weights_only_checkpoint(ptb_dir, tmp_path):
    v = load_ptb("word", data_dir=ptb_dir).vocab
    torch.save({"vocab": v.state_dict()}, tmp_path / "ck.pt")
    back = corpora.Vocabulary.from_state_dict(torch.load(tmp_path / "ck.pt", weights_only=True)["vocab"])
    assert back == v and back.unk == 1 and back.encode(["the", "zebra-x"]) == [2, 1]
