"""Using a trained run: `dni_rnn.load`, `dni-rnn generate`, `dni-rnn score`, on the smoke
recipes and a tiny sentencepiece run, and the README's "Use a trained model" as written."""
import ast
import importlib.util
import json
import re
import shlex

import pytest
import torch

import dni_rnn
from conftest import REPO, shared_data_root
from corpora import CharTokenizer, WordTokenizer, load_ptb
from dni_rnn.app.checkpoint import CheckpointError
from dni_rnn.app.sampling import generate, prompt_ids, sample_ids
from dni_rnn.app.training import evaluate_checkpoint
from dni_rnn.cli import main

VALID_LINES = 40  # the runs below validate on the first 40 lines of ptb.valid.txt
HAS_SP = importlib.util.find_spec("sentencepiece") is not None


def ptb():
    d = shared_data_root() / "ptb"
    if not (d / "ptb.train.txt").exists():
        pytest.skip(f"Penn Treebank files not found in {d}")
    return d


def first_lines(name, n):
    return "".join((ptb() / name).read_text().splitlines(keepends=True)[:n])


def ids_in(text, tokenizer):
    """Ids a corpus makes of `text`: each line's tokens and its <eos>."""
    return sum(len(tokenizer.tokenize(line)) + 1 for line in text.splitlines())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs trained once for this module, in one corpus cache (the sentencepiece model of
    the `sp` run stays there, where `load` finds it)."""
    root = tmp_path_factory.mktemp("use")
    valid = first_lines("ptb.valid.txt", VALID_LINES)
    (root / "valid.txt").write_text(valid)
    sp = root / "sp-text"
    sp.mkdir()
    for split, name, n in (("train", "ptb.train.txt", 2000), ("valid", "ptb.valid.txt", 100),
                           ("test", "ptb.test.txt", 100)):
        (sp / f"{split}.txt").write_text(first_lines(name, n))
    recipes = {
        "word": ["ptb-word-small-smoke", f"data.valid_tokens={ids_in(valid, WordTokenizer())}"],
        "char": ["ptb-char-smoke", f"data.valid_tokens={ids_in(valid, CharTokenizer())}"],
        "copy": ["copy-smoke"],
        "sp": ["wikitext-2-smoke", "data.corpus=text", f"data.path={sp}", "data.documents=line",
               "data.tokenizer=sentencepiece", "data.vocab_size=200", "data.valid_tokens=0"],
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DNI_RNN_CACHE_DIR", str(root / "cache"))
        for name, (recipe, *sets) in recipes.items():
            if name == "sp" and not HAS_SP:
                continue
            args = ["train", recipe, "--out", str(root / name), "--data-dir",
                    str(shared_data_root()), "--set", "train.progress=false"]
            assert main(args + [a for s in sets for a in ("--set", s)]) == 0, name
    return root


@pytest.fixture(autouse=True)
def _module_cache_one_thread(_isolated_caches, runs, monkeypatch):
    monkeypatch.setenv("DNI_RNN_CACHE_DIR", str(runs / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # generation steps one token at a time: threads only wait
    yield
    torch.set_num_threads(threads)


def loaded(runs, name):
    if name == "sp":
        pytest.importorskip("sentencepiece")
    return dni_rnn.load(runs / name, device="cpu")


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(result, *words):
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dni-rnn: error: "), err
    for w in words:
        assert w in lines[0], lines[0]


# ---- load ------------------------------------------------------------------------------------

def test_load_gives_the_model_in_eval_mode_its_tokenizer_config_and_state(runs):
    run = dni_rnn.load(runs / "word", device="cpu")
    assert not run.model.training and run.config.recipe == "ptb-word-small-smoke"
    assert run.checkpoint.name == "best.pt" and run.step in (2, 4)
    assert run.tokenizer.name == "word" and len(run.vocab) == 10000
    h, c = run.state(3)
    assert h.shape == c.shape == (2, 3, 200) and not h.any()
    x = torch.randint(len(run.vocab), (7, 3))                 # (T, B) one's own batch
    logits, state = run.model(x, run.state(3))
    assert logits.shape == (7, 3, 10000) and state[0].shape == (2, 3, 200)
    # the same weights as training's checkpoint
    saved = torch.load(run.checkpoint, weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in run.model.state_dict().items())


@pytest.mark.parametrize("name, corpus_level", [("word", "word"), ("char", "char")])
def test_encode_gives_the_training_ids(runs, name, corpus_level):
    run = dni_rnn.load(runs / name, device="cpu")
    valid = (runs / "valid.txt").read_text()
    ids = run.tokenizer.encode(valid)
    # ptb-char trained on ptb.char.valid.txt; its tokenizer reads the plain text the same
    corpus = load_ptb(corpus_level, data_dir=shared_data_root(), progress=False)
    assert torch.equal(torch.tensor(ids), corpus.valid[:len(ids)])
    assert ids[-1] == run.vocab.eos and len(ids) == ids_in(valid, run.tokenizer.tokenizer)


@pytest.mark.parametrize("name", ["word", "char", "sp"])
def test_encode_and_decode_round_trip(runs, name):
    run = loaded(runs, name)
    codec = run.tokenizer
    lines = [" ".join(line.split()) for line in (runs / "valid.txt").read_text().splitlines()]
    lines = [line for line in lines if not codec.unknown(codec.tokens(line))][:5]
    text = "\n".join(lines) + "\n"
    ids = run.tokenizer.encode(text)
    assert run.tokenizer.decode(ids) == text
    assert run.tokenizer.decode(torch.tensor(ids)) == text
    assert ids.count(run.vocab.eos) == 5
    assert run.tokenizer.encode("a b") + [run.vocab.eos] == run.tokenizer.encode("a b\n")


def test_sentencepiece_decodes_its_own_way(runs):
    run = loaded(runs, "sp")
    assert run.tokenizer.name == "sentencepiece" and len(run.vocab) == 200
    pieces = run.tokenizer.tokens("the company said")
    assert any(p.startswith("\u2581") for p in pieces)   # sentencepiece's word marker
    assert run.tokenizer.detokenize(pieces) == "the company said"


def test_load_refuses_paths_and_files_with_one_line(runs, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    pickled = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)   # a pickled class: weights_only refuses it
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "nope", "no such run directory"),
             (tmp_path / "empty", "no checkpoint (best.pt or last.pt)"),
             (foreign, "is not a dni_rnn checkpoint"),
             (pickled, "unreadable")]
    for path, words in cases:
        with pytest.raises(CheckpointError, match=re.escape(words)) as e:
            dni_rnn.load(path)
        assert "\n" not in str(e.value)


def test_a_checkpoint_that_does_not_fit_its_config(runs, tmp_path):
    c = torch.load(runs / "word" / "best.pt", weights_only=True)
    c["config"]["model"]["hidden_dim"] = 64
    torch.save(c, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="does not fit its own config"):
        dni_rnn.load(tmp_path / "odd.pt")


def test_a_sentencepiece_run_keeps_its_model_and_a_lost_one_is_named(runs, tmp_path,
                                                                      monkeypatch):
    pytest.importorskip("sentencepiece")
    monkeypatch.setenv("DNI_RNN_CACHE_DIR", str(tmp_path / "other-cache"))
    assert dni_rnn.load(runs / "sp").tokenizer.decode([5, 6, 7])  # the run's own copy
    moved = tmp_path / "sp"
    moved.mkdir()
    for name in ("best.pt", "config.toml"):
        if (runs / "sp" / name).exists():
            (moved / name).write_bytes((runs / "sp" / name).read_bytes())
    with pytest.raises(CheckpointError, match="sentencepiece model is not in"):
        dni_rnn.load(moved)


# ---- generate --------------------------------------------------------------------------------

def test_the_same_seed_gives_the_same_text(runs, capsys):
    run = dni_rnn.load(runs / "word", device="cpu")
    one = list(generate(run, "the company", tokens=30, seed=1))
    assert one == list(generate(run, "the company", tokens=30, seed=1))
    assert one != list(generate(run, "the company", tokens=30, seed=2))
    assert one[0] == "the company" and len(one) == 31            # the prompt, 30 tokens
    assert all(p == "\n" or p.startswith(" ") for p in one[1:])   # words, spaces between
    code, out, _ = run_main(capsys, "generate", runs / "word", "--prompt", "the company",
                            "--tokens", 30, "--seed", 1, "--device", "cpu")
    assert code == 0 and out == "".join(one) + ("" if one[-1] == "\n" else "\n")
    greedy = list(generate(run, "the", tokens=5, temperature=0))
    assert greedy == list(generate(run, "the", tokens=5, temperature=0, seed=9))
    top1 = list(generate(run, "the", tokens=5, top_k=1, seed=3))
    assert top1 == greedy


def test_unknown_prompt_words_become_unk_with_a_note(runs, capsys):
    code, out, err = run_main(capsys, "generate", runs / "word", "--prompt", "the Zyzzyva market",
                              "--tokens", 3, "--seed", 1)
    assert code == 0 and out.startswith("the <unk> market")
    assert "note" in err and "'Zyzzyva'" in err and "<unk>" in err


def test_characters_come_out_without_spaces_between(runs, capsys):
    code, out, err = run_main(capsys, "generate", runs / "char", "--prompt", "The market",
                              "--tokens", 20, "--seed", 1)
    assert code == 0 and out.startswith("he market")   # no <unk> for characters: left out
    assert "'T'" in err and "left out" in err
    run = dni_rnn.load(runs / "char", device="cpu")
    pieces = list(generate(run, "the", tokens=20, seed=1))
    assert all(len(p) == 1 for p in pieces[1:])          # one character a token, "_" a space
    assert "_" not in "".join(pieces)


@pytest.mark.parametrize("name", ["word", "char", "sp"])
def test_the_streamed_text_is_the_tokenizers_decoding(runs, name):
    run = loaded(runs, name)
    ids, _ = prompt_ids(run.tokenizer, "the company")
    sampled = list(sample_ids(run, ids, 40, seed=1))
    text = "".join(generate(run, "the company", tokens=40, seed=1))
    assert text == run.tokenizer.decode(ids[1:] + sampled) and text.startswith("the company")


def test_generate_on_a_copy_run_shows_an_episode(runs, capsys):
    code, out, err = run_main(capsys, "generate", runs / "copy", "--seed", 1)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("copy, N=") and lines[1].split() == ["t", "input", "target",
                                                                   "answer", "wrong"]
    assert re.fullmatch(r"wrong bits: \d+ of \d+ \(step \d+\)", lines[-1])
    wrong = sum(int(line.split()[-1]) for line in lines[2:-1] if len(line.split()) == 8)
    assert lines[-1].startswith(f"wrong bits: {wrong} of ")
    assert run_main(capsys, "generate", runs / "copy", "--seed", 1)[1] == out


# ---- score -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, file", [("word", "valid.txt"), ("char", "valid.txt"),
                                        ("sp", "sp-text/valid.txt")])
def test_score_of_the_valid_file_is_evaluates_valid_number(runs, capsys, name, file):
    loaded(runs, name)
    code, out, _ = run_main(capsys, "score", runs / name, runs / file, "--json")
    assert code == 0
    r = json.loads(out)
    valid = evaluate_checkpoint(runs / name, split="valid", data_dir=shared_data_root())
    metric = valid["metric"]
    assert r["metric"] == metric == ("bpc" if name == "char" else "ppl")
    assert r["files"][0]["loss"] == pytest.approx(valid["loss"], rel=1e-6)
    assert r["total"][metric] == pytest.approx(valid[metric], rel=1e-6)
    if name == "sp":  # data.documents = line: the state restarts at every line, as in training
        assert dni_rnn.load(runs / name).config.data.documents == "line"


def test_score_reports_each_file_and_the_total(runs, capsys):
    other = runs / "other.txt"
    other.write_text(first_lines("ptb.test.txt", 30))
    code, out, _ = run_main(capsys, "score", runs / "word", runs / "valid.txt", other, "--json")
    r = json.loads(out)
    files, total = r["files"], r["total"]
    assert code == 0 and [f["file"] for f in files] == [str(runs / "valid.txt"), str(other)]
    assert total["tokens"] == sum(f["tokens"] for f in files)
    assert total["unk"] == sum(f["unk"] for f in files) > 0          # PTB writes <unk> itself
    assert total["loss"] == pytest.approx(sum(f["loss"] * f["tokens"] for f in files)
                                          / total["tokens"])
    ids = dni_rnn.load(runs / "word").tokenizer.encode((runs / "valid.txt").read_text())
    assert files[0]["tokens"] == (len(ids) // 10 - 1) * 10   # 10 streams, as evaluate reads
    code, out, _ = run_main(capsys, "score", runs / "word", runs / "valid.txt", other)
    lines = out.splitlines()
    assert code == 0 and lines[1].split() == ["file", "tokens", "<unk>", "loss", "ppl"]
    assert lines[-1].split()[0] == "total" and len(lines) == 5


def test_score_a_short_text(runs, capsys):
    short = runs / "short.txt"
    short.write_text("the market fell\n")
    code, out, _ = run_main(capsys, "score", runs / "word", short, "--json")
    assert code == 0 and json.loads(out)["total"]["tokens"] == 2   # 4 ids: 2 streams of 2


def test_score_errors_are_one_line(runs, tmp_path, capsys):
    assert_one_line_error(run_main(capsys, "score", runs / "word", tmp_path / "missing.txt"),
                          "not found", "missing.txt")
    assert_one_line_error(run_main(capsys, "score", runs / "copy", runs / "valid.txt"),
                          "language-model run")
    upper = tmp_path / "upper.txt"
    upper.write_text("the market\nThe End\n")
    assert_one_line_error(run_main(capsys, "score", runs / "char", upper), "'T'", "line 2")
    assert_one_line_error(run_main(capsys, "score", tmp_path, upper), "no checkpoint")
    garbage = tmp_path / "best.pt"
    garbage.write_text("not a checkpoint")
    assert_one_line_error(run_main(capsys, "generate", garbage), "corrupt or unreadable")
    assert_one_line_error(run_main(capsys, "generate", runs / "word", "--tokens", -1), "--tokens")


# ---- the README ------------------------------------------------------------------------------

def test_the_readme_use_section_runs_as_written(runs, tmp_path, monkeypatch, capsys):
    """The commands of README's "Use a trained model", in a fresh folder, then its Python
    (a ```py block: tests/test_readme.py runs the ```python ones, which need no run)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Use a trained model"):]
    section = section[:section.index("\n## ", 1)]
    commands = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    code = re.search(r"```py\n(.*?)```", section, flags=re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DNI_RNN_DATA_DIR", str(ptb().parent))
    (tmp_path / "my.txt").write_text(first_lines("ptb.test.txt", 20))
    outputs = []
    for line in commands.strip().splitlines():
        args = shlex.split(line, comments=True)
        assert args[0] == "dni-rnn"
        assert main(args[1:]) == 0, line
        outputs.append(capsys.readouterr().out)
    assert outputs[1].startswith("the company") and len(outputs[1].split()) > 2
    assert "total" in outputs[2]
    exec(compile(code, "README.md", "exec"), {})
    assert len(ast.literal_eval(capsys.readouterr().out)) == 5   # the five likeliest next words
