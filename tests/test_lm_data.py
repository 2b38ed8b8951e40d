"""Every language-model corpus from the config (dni_rnn/lm_data.py): resets at document
starts, no state across them, the CLI on local text / WikiText / sentencepiece / HF files,
and the one-line errors. Offline: every file is written here, HF runs in offline mode."""
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from corpora import CorpusError
from dni_rnn import TBPTTRunner
from dni_rnn import config as C
from dni_rnn.cli import main
from dni_rnn.lm_data import load_lm_data, metric_name, text_splits
from dni_rnn.tasks import LanguageModelTask

WORDS = ("the a of to in and is was for on as with by at from his her it that which "
         "game city river war album song team league season film").split()


def data_cfg(**kw):
    d = C.DataConfig()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def make_lines(n, rng, unk=False):
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        if unk and rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), "<unk>")
        lines.append(" ".join(words))
    return lines


@pytest.fixture
def tiny(tmp_path):
    """Hand-sized splits whose (N, B) resets are written out in the tests."""
    d = tmp_path / "tiny"
    d.mkdir()
    # train ids: a b c <eos> | d <eos> | e f <eos> | g h i j <eos> | k <eos>  (16 ids)
    (d / "train.txt").write_text("a b c\nd\ne f\ng h i j\nk\n")
    # valid: a b <eos> | c <eos> | d e f <eos>  (9 ids); test: one line, one document
    (d / "valid.txt").write_text("a b\nc\nd e f\n")
    (d / "test.txt").write_text("a b c d e f g\n")
    return d


@pytest.fixture
def text_dir(tmp_path):
    """A few hundred lines for end-to-end runs; every valid/test word occurs in train."""
    rng = random.Random(0)
    d = tmp_path / "text"
    d.mkdir()
    (d / "train.txt").write_text("\n".join([" ".join(WORDS)] + make_lines(400, rng)) + "\n")
    (d / "valid.txt").write_text("\n".join(make_lines(80, rng)) + "\n")
    (d / "test.txt").write_text("\n".join(make_lines(80, rng)) + "\n")
    return d


@pytest.fixture
def wikitext_dir(tmp_path):
    """WikiText-2's layout and look: ' = Title = ' headings, blank lines, <unk>."""
    rng = random.Random(1)
    d = tmp_path / "wikitext"
    d.mkdir()
    for split, articles in (("train", 12), ("valid", 3), ("test", 3)):
        lines = [" " + " ".join(WORDS) + " <unk> "] if split == "train" else []
        for k in range(articles):
            lines += [" ", f" = {rng.choice(WORDS).title()} {k} = ", " "]
            for _ in range(3):
                lines += [" " + p + " " for p in make_lines(5, rng, unk=True)] + [" "]
        (d / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n")
    return d


# ---- resets: exactly at the document starts of each stream ---------------------------------

def test_line_documents_reset_at_line_starts(tiny):
    lm = load_lm_data(data_cfg(corpus="text", path=str(tiny), documents="line",
                               batch_size=2, eval_batch_size=2))
    # 16 train ids -> N = 8 rows x B = 2 streams; starts at ids 0, 4, 6 (stream 0) and
    # 9, 14 = rows 1, 6 of stream 1 (which holds ids 8..15)
    T, F = True, False
    assert lm.resets.tolist() == [[T, F], [F, T], [F, F], [F, F], [T, F], [F, F], [T, T], [F, F]]
    assert lm.vocab.decode(lm.train[:, 1]) == ["<eos>", "g", "h", "i", "j", "<eos>", "k", "<eos>"]
    # 9 valid ids -> 4 x 2 (the 9th is dropped); starts at 0, 3 and 5 = row 1 of stream 1
    assert lm.valid_resets.tolist() == [[T, F], [F, T], [F, F], [T, F]]
    assert lm.test_resets is None  # one line: one document
    assert (lm.metric, lm.name, lm.train.shape, lm.valid.shape) == ("ppl", "text (word)", (8, 2),
                                                                    (4, 2))
    # every reset but a stream's first row follows an <eos>
    rows, cols = torch.nonzero(lm.resets[1:], as_tuple=True)
    assert lm.train[rows, cols].tolist() == [lm.vocab.eos] * 4


def test_file_documents_reset_at_file_starts(tmp_path):
    layout = {"train": {"01.txt": "a b\nc\n", "02.txt": "d e f\n", "03.txt": "g\nh i\n"},
              "valid": {"1.txt": "a b c\n", "2.txt": "d e\nf\n"},
              "test": {"only.txt": "g h i\n"}}
    for split, files in layout.items():
        (tmp_path / split).mkdir()
        for name, text in files.items():
            (tmp_path / split / name).write_text(text)
    # data.path names the training folder; valid/ and test/ are found beside it
    lm = load_lm_data(data_cfg(corpus="text", path=str(tmp_path / "train"), documents="file",
                               batch_size=2, eval_batch_size=2))
    # train: 5 + 4 + 5 = 14 ids, starts 0, 5, 9 -> N = 7; stream 0 rows 0, 5; stream 1 row 2
    T, F = True, False
    assert lm.resets.tolist() == [[T, F], [F, F], [F, T], [F, F], [F, F], [T, F], [F, F]]
    # valid: 4 + 5 = 9 ids, starts 0, 4 -> N = 4 (the 9th dropped); stream 1 = the second file
    assert lm.valid_resets.tolist() == [[T, T], [F, F], [F, F], [F, F]]
    assert lm.test_resets is None


def test_one_file_per_split_is_one_document(tiny):
    lm = load_lm_data(data_cfg(corpus="text", path=str(tiny), documents="file",
                               batch_size=2, eval_batch_size=2))
    assert lm.resets is None and lm.valid_resets is None and lm.test_resets is None


def test_text_splits_forms(tmp_path):
    (tmp_path / "ptb.train.txt").write_text("a\n")
    (tmp_path / "ptb.valid.txt").write_text("a\n")
    (tmp_path / "ptb.test.txt").write_text("a\n")
    d = str(tmp_path)
    assert text_splits(d) == {s: [tmp_path / f"ptb.{s}.txt"] for s in ("train", "valid", "test")}
    assert text_splits(f"{d}/ptb.train.txt") == {s: f"{d}/ptb.{s}.txt"
                                                 for s in ("train", "valid", "test")}
    for s in ("train", "dev", "test"):
        (tmp_path / s).mkdir()
        (tmp_path / s / "x.txt").write_text("a\n")
    assert text_splits(f"{d}/train/*.txt") == {"train": f"{d}/train/*.txt",
                                               "valid": f"{d}/dev/*.txt", "test": f"{d}/test/*.txt"}


# ---- no state crosses a document boundary ---------------------------------------------------

def tiny_task(tiny, **kw):
    cfg = C.Config()
    cfg.data = data_cfg(corpus="text", path=str(tiny), documents="line", batch_size=2,
                        eval_batch_size=2)
    cfg.model.embed_dim = cfg.model.hidden_dim = 8
    cfg.model.num_layers = 1
    cfg.train.truncation = 3
    return LanguageModelTask(cfg)


def test_train_chunk_does_not_leak_state_across_a_document_start(tiny):
    torch.manual_seed(0)
    task = tiny_task(tiny)
    stream = task.train_stream("cpu")
    # rows 0..6 of the (8, 2) ids; stream 1 starts mid-document and resets at rows 1 and 6
    assert stream.resets[:, 1].nonzero().flatten().tolist() == [1, 6]
    model = task.build_model()

    def grads(loss_fn, resets):
        state = tuple(torch.randn_like(t).requires_grad_() for t in model.init_state(2))
        runner = TBPTTRunner(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.0),
                             clip=0.0)
        runner.train_chunk(stream.inputs, stream.targets, state, resets=resets)
        return [t.grad for t in state]  # (layers, B, H) each: d loss / d initial state

    after = lambda out, y: out[1:, 1].sum()   # stream 1 from its reset at row 1 on
    before = lambda out, y: out[:1, 1].sum()  # stream 1 before it
    assert all(g.abs().sum() == 0 for g in grads(after, stream.resets))
    assert all(g[:, 1].abs().sum() > 0 for g in grads(before, stream.resets))
    assert all(g[:, 1].abs().sum() > 0 for g in grads(after, None))  # the test can see a leak


def test_evaluate_resets_state_at_documents(tiny):
    torch.manual_seed(0)
    task = tiny_task(tiny)
    model = task.build_model()
    runner = TBPTTRunner(model, task.loss_fn, torch.optim.SGD(model.parameters(), lr=0.0))
    valid, resets = task.data.valid, task.data.valid_resets
    # (4, 2) valid ids: stream 1 resets at row 1 (row 3 of stream 0 is no input)
    with_resets, full = runner.evaluate(valid[:-1], valid[1:], resets=resets[:-1],
                                        chunk_length=3)
    without, _ = runner.evaluate(valid[:-1], valid[1:], chunk_length=3)
    got = task.evaluate(model, "valid", "cpu")  # the task passes its resets
    assert got["loss"] == with_resets and with_resets != without
    # stream 1's final state is that of a fresh start at its reset (row 1); stream 0's is not
    _, fresh = runner.evaluate(valid[1:-1], valid[2:], chunk_length=3)
    assert all(torch.allclose(a[:, 1], b[:, 1]) and not torch.allclose(a[:, 0], b[:, 0])
               for a, b in zip(full, fresh))


# ---- the CLI, offline ---------------------------------------------------------------------

def train_cli(capsys, tmp_path, *sets, recipe="wikitext-2-smoke", extra=()):
    run = tmp_path / "run"
    args = ["train", recipe, "--out", str(run), "--set", "train.progress=false", *extra]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads((run / "summary.json").read_text()), out.out


@pytest.mark.parametrize("tokenizer, metric", [("word", "ppl"), ("char", "bpc")])
def test_cli_trains_on_local_text(tokenizer, metric, text_dir, tmp_path, capsys):
    summary, out = train_cli(capsys, tmp_path, "data.corpus=text", f"data.path={text_dir}",
                             f"data.tokenizer={tokenizer}", "data.documents=line")
    assert summary["steps"] == 4 and summary["metric"] == metric
    assert f"text ({tokenizer})" in out and "document starts" in out and f"test {metric}" in out
    if metric == "ppl":  # 30 words plus <eos>: a barely trained model is near 31
        assert 5 < summary["test_ppl"] < 60
    else:
        assert 1 < summary["test_bpc"] < 8


def test_wikitext_2_smoke_on_local_files(wikitext_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "dni_rnn", "train", "wikitext-2-smoke", "--data-dir",
                        str(wikitext_dir), "--out", str(tmp_path / "run"), "--set",
                        "train.progress=false"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["recipe"] == "wikitext-2-smoke" and summary["steps"] == 4
    types = len(set((wikitext_dir / "wiki.train.tokens").read_text().split())) + 1  # <eos>
    # the headings' title-case words are unseen in training: reported, as <unk>
    assert re.search(rf"wikitext-2 \(word; held-out tokens outside the vocabulary, now <unk>: "
                     rf"valid \d+ of [\d,]+, test \d+ of [\d,]+\): {types} types", p.stdout)
    assert 5 < summary["test_ppl"] < 80 and "document starts" not in p.stdout


def test_every_smoke_recipe_runs_somewhere():
    from helpers import SMOKE

    smoke = {n for n in C.shipped_recipes() if n.endswith("-smoke")}
    # wikitext-2-smoke runs just above, the Zaremba one in test_training (plain TBPTT),
    # copy-cdni-smoke and the two PTB cDNI ones in test_context (trained, resumed, diagnosed)
    assert smoke == set(SMOKE) | {"wikitext-2-smoke", "ptb-word-zaremba-small-smoke",
                                  "copy-cdni-smoke", "ptb-char-cdni-smoke",
                                  "ptb-word-small-cdni-smoke"}


def test_sentencepiece_tiny_vocabulary(text_dir, tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    d = data_cfg(corpus="text", path=str(text_dir), tokenizer="sentencepiece", vocab_size=40)
    lm = load_lm_data(d)
    assert len(lm.vocab) == 40 and lm.vocab.itos[:2] == ["<unk>", "<eos>"]
    assert (lm.metric, lm.name) == ("ppl", "text (sentencepiece)")
    assert lm.corpus.decode(lm.corpus.valid) == (text_dir / "valid.txt").read_text()
    summary, _ = train_cli(capsys, tmp_path, "data.corpus=text", f"data.path={text_dir}",
                           "data.tokenizer=sentencepiece", "data.vocab_size=40")
    assert summary["metric"] == "ppl" and 1 < summary["test_ppl"] < 80


def test_word_vocab_cap(text_dir):
    lm = load_lm_data(data_cfg(corpus="text", path=str(text_dir), vocab_size=10))
    assert len(lm.vocab) == 10 and lm.vocab.itos[:2] == ["<eos>", "<unk>"]


def test_hf_local_files_match_the_text_loader(text_dir):
    pytest.importorskip("datasets")
    hf = load_lm_data(data_cfg(corpus="hf", hf_name="text", path=str(text_dir), documents="line"))
    local = load_lm_data(data_cfg(corpus="text", path=str(text_dir), documents="line"))
    assert hf.vocab == local.vocab and hf.name == "text (word)"
    for s in ("train", "valid", "test"):
        (a, ra), (b, rb) = hf.split(s), local.split(s)
        assert torch.equal(a, b) and torch.equal(ra, rb) and ra[1:].any()
    one_stream = load_lm_data(data_cfg(corpus="hf", hf_name="text", path=str(text_dir)))
    assert one_stream.resets is None and torch.equal(one_stream.train, local.train)


def test_ptb_unchanged(ptb_dir):
    lm = load_lm_data(data_cfg(train_tokens=8000, valid_tokens=2000, test_tokens=2000),
                      data_dir=ptb_dir)
    assert (lm.name, lm.metric, len(lm.vocab)) == ("ptb-word", "ppl", 10000)
    assert lm.train.shape == (400, 20) and lm.valid.shape == (200, 10)
    assert lm.resets is None and lm.valid_resets is None and lm.test_resets is None
    assert load_lm_data(data_cfg(corpus="ptb-char", train_tokens=100), ptb_dir).metric == "bpc"


# ---- what a user gets wrong ---------------------------------------------------------------

def one_line_error(capsys, *args):
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dni-rnn: error: "), err
    return err[0]


def test_missing_path_and_unknown_tokenizer(tmp_path, capsys):
    nope = tmp_path / "nope" / "train.txt"
    line = one_line_error(capsys, "train", "wikitext-2-smoke", "--out", tmp_path / "r",
                          "--set", "data.corpus=text", "--set", f"data.path={nope}")
    assert f"data.path: no such file, folder or glob match: {nope}" in line
    line = one_line_error(capsys, "train", "wikitext-2-smoke", "--set", "data.tokenizer=bytes")
    assert "data.tokenizer must be one of auto, word, char, sentencepiece, got 'bytes'" in line
    line = one_line_error(capsys, "train", "wikitext-2-smoke", "--set", "data.corpus=text")
    assert "data.corpus=text needs data.path" in line
    (tmp_path / "empty").mkdir()
    line = one_line_error(capsys, "train", "wikitext-2-smoke", "--out", tmp_path / "r2",
                          "--data-dir", tmp_path / "empty")
    assert "WikiText-2 files missing in" in line and "wiki.train.tokens" in line


@pytest.mark.parametrize("sets, words", [
    (["data.tokenizer=char"], "data.tokenizer=char conflicts with data.corpus=ptb-word"),
    (["data.tokenizer=sentencepiece"], "conflicts with data.corpus=ptb-word"),
    (["data.vocab_size=5000"], "data.vocab_size=5000: ptb-word has a fixed vocabulary"),
    (["data.corpus=hf"], "data.corpus=hf needs data.hf_name"),
    (["data.corpus=hf", "data.hf_name=x", "data.hf_split=valid"], "data.hf_split: expected"),
    (["data.documents=para"], "data.documents must be one of file, line"),
])
def test_config_errors(sets, words):
    with pytest.raises(C.ConfigError, match=words):
        C.load_recipe("ptb-word-small", sets)


def test_ptb_rule_same_level_is_fine():
    assert metric_name(C.load_recipe("ptb-word-small", ["data.tokenizer=word"]).data) == "ppl"
    assert metric_name(C.load_recipe("ptb-char", ["data.tokenizer=char"]).data) == "bpc"
    assert metric_name(C.load_recipe("wikitext-2", ["data.tokenizer=char"]).data) == "bpc"


def test_data_errors_name_the_fix(tmp_path, text_dir):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "train.txt").write_text("a\n")
    with pytest.raises(CorpusError, match="has train text but no valid file or folder"):
        load_lm_data(data_cfg(corpus="text", path=str(tmp_path / "only")))
    with pytest.raises(CorpusError, match="cannot tell the splits of"):
        load_lm_data(data_cfg(corpus="text", path=str(text_dir / "valid.txt")))


def test_sentencepiece_default_vocabulary_too_large(text_dir):
    pytest.importorskip("sentencepiece")
    with pytest.raises(CorpusError, match="sentencepiece training failed.*vocab_size=8000"):
        load_lm_data(data_cfg(corpus="text", path=str(text_dir / "train.txt"),
                              tokenizer="sentencepiece"))


def test_hf_unknown_dataset_offline(text_dir):
    pytest.importorskip("datasets")
    with pytest.raises(CorpusError, match="could not load Hugging Face dataset no-such/dataset "
                                          r"\(HF offline mode is on"):
        load_lm_data(data_cfg(corpus="hf", hf_name="no-such/dataset"))
