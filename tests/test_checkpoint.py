"""Checkpoints: atomic writes, weights_only loading, one-line errors, identity checks."""
import random

import numpy as np
import pytest
import torch

from dni_rnn import checkpoint as ckpt
from dni_rnn.config import load_recipe


def _obj(**extra):
    return {"format": ckpt.FORMAT, "version": ckpt.VERSION, "w": torch.arange(6.0),
            "nested": ({"a": [1, 2.5, None, "x", True]}, (torch.zeros(2), torch.ones(1))),
            **extra}


def test_round_trip_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save(_obj(rng=ckpt.rng_state()), path)
    back = ckpt.load(path)
    assert torch.equal(back["w"], torch.arange(6.0))
    assert back["nested"][0]["a"] == [1, 2.5, None, "x", True]
    torch.load(path, weights_only=True)  # what load uses, directly
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.save(_obj(step=1), path)

    def dies(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(_obj(step=2), path)
    monkeypatch.undo()
    assert ckpt.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None])
def test_corrupt_files_give_one_line(tmp_path, content):
    path = tmp_path / "c.pt"
    if content is None:  # a real checkpoint, truncated
        ckpt.save(_obj(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(path)
    assert "corrupt" in str(e.value) and "\n" not in str(e.value)


def test_foreign_and_missing_files_are_refused(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a dni_rnn checkpoint"):
        ckpt.load(tmp_path / "other.pt")
    torch.save(_obj(version=99), tmp_path / "future.pt")
    with pytest.raises(ckpt.CheckpointError, match="version 99"):
        ckpt.load(tmp_path / "future.pt")
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load(tmp_path / "none.pt")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.find(tmp_path)
    ckpt.save(_obj(), tmp_path / "last.pt")
    assert ckpt.find(tmp_path).name == "last.pt"
    ckpt.save(_obj(), tmp_path / "best.pt")
    assert ckpt.find(tmp_path).name == "best.pt"


def test_rng_state_restores_every_generator(tmp_path):
    state = ckpt.rng_state()
    draws = (torch.rand(3), random.random(), np.random.rand())
    ckpt.save(_obj(rng=state), tmp_path / "c.pt")
    ckpt.set_rng_state(ckpt.load(tmp_path / "c.pt")["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


def test_other_model_recipe_or_vocabulary_is_refused():
    base = load_recipe("ptb-word-small").to_dict()
    ckpt.check_compatible(base, base, "x.pt")
    same = load_recipe("ptb-word-small", ["train.max_steps=9", "data.valid_tokens=5",
                                          "optim.lr=0.01"]).to_dict()
    ckpt.check_compatible(base, same, "x.pt")  # budget, lr and eval sizes may change
    wider = load_recipe("ptb-word-small", ["model.hidden_dim=300"]).to_dict()
    with pytest.raises(ckpt.CheckpointError, match="model.hidden_dim=200.*300"):
        ckpt.check_compatible(base, wider, "x.pt")
    bptt = load_recipe("ptb-word-small", ["dni.method=bptt"]).to_dict()
    with pytest.raises(ckpt.CheckpointError, match=r"trained with dni\.\w+="):
        ckpt.check_compatible(base, bptt, "x.pt")  # the method and DNI's synthesizer
    with pytest.raises(ckpt.CheckpointError, match="recipe 'ptb-word-small', not 'ptb-char'"):
        ckpt.check_compatible(base, load_recipe("ptb-char").to_dict(), "x.pt")
    # a checkpoint from before a key existed ran with its default: resumable, unless changed
    older = {**base, "dni": {k: v for k, v in base["dni"].items() if k != "replay"}}
    ckpt.check_compatible(older, base, "x.pt")
    replayed = load_recipe("ptb-word-small", ["dni.replay=4"]).to_dict()
    with pytest.raises(ckpt.CheckpointError, match="dni.replay=0.*4"):
        ckpt.check_compatible(older, replayed, "x.pt")

    from corpora import Vocabulary
    v = Vocabulary(["<eos>", "a", "b"])
    ckpt.check_vocab(v.state_dict(), v, "x.pt")
    with pytest.raises(ckpt.CheckpointError, match="vocabulary mismatch"):
        ckpt.check_vocab(Vocabulary(["<eos>", "b", "a"]).state_dict(), v, "x.pt")


def test_link_makes_last_the_same_checkpoint_until_replaced(tmp_path):
    ckpt.save(_obj(step=1), tmp_path / "best.pt")
    ckpt.link(tmp_path / "best.pt", tmp_path / "last.pt")
    assert ckpt.load(tmp_path / "last.pt")["step"] == 1
    ckpt.save(_obj(step=2), tmp_path / "last.pt")  # a later, worse step replaces last only
    assert ckpt.load(tmp_path / "best.pt")["step"] == 1
    assert ckpt.load(tmp_path / "last.pt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
