"""A local text corpus from the CLI (data.corpus=text) with the input users really have:
held-out words training never saw, blank lines, bytes that are not UTF-8, an empty split,
splits shorter than one chunk or than their streams. Each trains or ends in one line."""
import json
import random

import pytest

from corpora import CorpusError
from dni_rnn import config as C
from dni_rnn.cli import main
from dni_rnn.lm_data import load_lm_data

WORDS = "the a of to in and is was for on as with by at from game city river war album".split()


def lines(n, rng):
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                     for _ in range(n)) + "\n"


@pytest.fixture
def corpus(tmp_path):
    """Train holds every word of WORDS; valid adds "zebra" (twice) and "sat", test "okapi"."""
    rng = random.Random(0)
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "train.txt").write_text(" ".join(WORDS) + "\n" + lines(200, rng))
    (d / "valid.txt").write_text(lines(30, rng) + "the zebra sat on a zebra\n")
    (d / "test.txt").write_text("the okapi\n" + lines(30, rng))
    return d


def data_cfg(path, **kw):
    d = C.DataConfig(corpus="text", path=str(path))
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def train(capsys, tmp_path, *sets):
    args = ["train", "ptb-word-small-smoke", "--out", str(tmp_path / "run"), "--set",
            "train.progress=false", "--set", "train.max_steps=2"]
    for s in ("data.corpus=text", *sets):
        args += ["--set", s]
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def one_line_error(capsys, tmp_path, *sets):
    code, _, err = train(capsys, tmp_path, *sets)
    assert code == 2 and len(err) == 1 and err[0].startswith("dni-rnn: error: "), err
    return err[0]


@pytest.mark.parametrize("sets", [(), ("data.vocab_size=10000",)])
def test_unseen_held_out_words_train_and_are_counted(corpus, tmp_path, capsys, sets):
    code, out, err = train(capsys, tmp_path, f"data.path={corpus}", *sets)
    assert code == 0, err
    valid_n = len((corpus / "valid.txt").read_text().split()) + 31  # + an <eos> per line
    # sat is unseen too: zebra, sat, zebra
    assert (f"text (word; held-out tokens outside the vocabulary, now <unk>: valid 3 of "
            f"{valid_n:,}, test 1 of ") in out
    assert f"{len(WORDS) + 2} types" in out  # the words, <eos> and the reserved <unk>
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["test_ppl"] > 1


def test_characters_unseen_in_training_become_unk(corpus):
    lm = load_lm_data(data_cfg(corpus, tokenizer="char"))
    assert lm.vocab.unk == 1 and "z" not in lm.vocab  # zebra's z: only in valid
    assert lm.corpus.info["unk"]["valid"] == 2 and "(char; held-out tokens" in lm.name


def test_min_count_sends_rare_training_words_to_unk(corpus):
    (corpus / "train.txt").write_text((corpus / "train.txt").read_text() + "gnu\n")
    lm = load_lm_data(data_cfg(corpus, min_count=2))
    assert "gnu" not in lm.vocab and lm.corpus.info["unk"]["train"] == 1
    with pytest.raises(C.ConfigError, match="data.min_count=2: only a word or char vocabulary"):
        C.load_recipe("ptb-word-small", ["data.min_count=2"])
    with pytest.raises(C.ConfigError, match="data.min_count must be >= 1"):
        C.load_recipe("ptb-word-small", ["data.corpus=text", "data.path=x", "data.min_count=0"])


def test_blank_lines_train(corpus, tmp_path, capsys):
    (corpus / "valid.txt").write_text("\n\n" + (corpus / "valid.txt").read_text() + "\n  \n")
    code, out, err = train(capsys, tmp_path, f"data.path={corpus}", "data.documents=line")
    assert code == 0, err
    lm = load_lm_data(data_cfg(corpus))  # a blank line is one <eos>
    assert lm.vocab.decode(lm.corpus.valid[:2]) == ["<eos>", "<eos>"]


def test_non_utf8_bytes_are_one_line_naming_file_byte_and_line(corpus, tmp_path, capsys):
    with open(corpus / "train.txt", "ab") as f:
        f.write(b"caf\xe9 war\n")
    at = (corpus / "train.txt").read_bytes().index(b"\xe9")
    line = one_line_error(capsys, tmp_path, f"data.path={corpus}")
    assert (f"train: {corpus / 'train.txt'} is not valid utf-8 text (byte {at}, line 202: "
            f"b'\\xe9'); convert it to utf-8 (e.g. iconv -f latin1 -t utf-8)") in line


def test_empty_split_is_one_line(corpus, tmp_path, capsys):
    (corpus / "test.txt").write_text("")
    line = one_line_error(capsys, tmp_path, f"data.path={corpus}")
    assert f"test: text file is empty: {corpus / 'test.txt'}; every split needs text" in line


@pytest.mark.parametrize("split, text, words", [
    ("valid", "the war\n", "the valid split has 3 tokens, but data.eval_batch_size=10 streams "
                           "need at least 20 (2 each); add valid text or lower "
                           "data.eval_batch_size"),
    ("test", "the war a of to in and is was for\n", "the test split has 11 tokens"),
    ("train", " ".join(WORDS) + "\n", "the train split has 21 tokens, but data.batch_size=20 "
                                      "streams need at least 40"),
])
def test_split_shorter_than_its_streams_is_one_line(corpus, tmp_path, capsys, split, text,
                                                    words):
    (corpus / f"{split}.txt").write_text(text)
    assert words in one_line_error(capsys, tmp_path, f"data.path={corpus}")


def test_split_cut_too_short_names_the_key(corpus):
    with pytest.raises(CorpusError, match=r"valid split has 15 tokens \(cut by "
                                          r"data.valid_tokens\), but data.eval_batch_size=10"):
        load_lm_data(data_cfg(corpus, valid_tokens=15))


def test_splits_shorter_than_one_chunk_train(corpus, tmp_path, capsys):
    # T = 35 steps; valid and test hold 2-3 steps per stream, train 5
    (corpus / "train.txt").write_text(" ".join(WORDS) + "\n" + lines(8, random.Random(1)))
    for split in ("valid", "test"):
        (corpus / f"{split}.txt").write_text(" ".join(WORDS[:12]) + "\n" + " ".join(WORDS) + "\n")
    code, out, err = train(capsys, tmp_path, f"data.path={corpus}")
    assert code == 0, err
    lm = load_lm_data(data_cfg(corpus))
    assert lm.train.shape[0] < 35 and lm.valid.shape[0] < 35
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_ppl"] > 1
