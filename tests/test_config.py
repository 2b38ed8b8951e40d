"""Config: defaults, recipes, --set parsing and one-line errors."""
import dataclasses
from pathlib import Path

import pytest

from dni_rnn import config as C
from dni_rnn.lm_data import metric_name
from dni_rnn.tasks import CopyTask
from helpers import STATE_ONLY_DNI


def test_every_shipped_recipe_loads_and_validates():
    known = C.shipped_recipes()
    for name in ("ptb-word-small", "ptb-word-medium", "ptb-char", "copy", "repeat-copy", "demo"):
        assert name in known
        assert f"{name}-smoke" in known or name == "demo"
    for name, path in known.items():
        cfg = C.load_recipe(name)
        assert cfg.recipe == name
        assert cfg.description and "\n" not in cfg.description
        assert C.describe_recipe(path) == cfg.description


def test_recipe_values_override_defaults():
    cfg = C.load_recipe("ptb-word-medium")
    assert (cfg.model.hidden_dim, cfg.model.num_layers, cfg.model.dropout) == (650, 2, 0.5)
    assert cfg.data.batch_size == 20 and cfg.train.truncation == 35   # from ptb-word-small
    small = C.load_recipe("ptb-word-small")
    assert (small.optim.name, small.optim.lr, small.optim.clip) == ("adam", 1e-3, 0.25)
    # DNI as the library defines it, with the synthesizer that reads the next 5 words
    cdni = dict(context="targets", context_code="decoder", context_steps=5, synth_layers=0,
                refit=1e-3, refit_every=10, replay_chunks=256)
    assert small.dni == dataclasses.replace(C.DNIConfig(), **cdni)
    assert (C.load_recipe("ptb-word-small", STATE_ONLY_DNI).dni ==
            dataclasses.replace(C.DNIConfig(), **{**cdni, "context": "none", "synth_layers": 1,
                                                  "refit": 0.0}))
    assert (small.train.epochs, small.train.log_interval) == (6, 200)
    assert (cfg.dni.target_scale, cfg.dni.sg_cap, cfg.dni.sg_scale) == ("rms", 1.0, 0.1)  # medium
    assert metric_name(C.load_recipe("ptb-char").data) == "bpc"
    assert CopyTask(C.load_recipe("copy")).metric.name == "length"


def test_bptt_and_dni_are_one_set_apart():
    dni = C.load_recipe("ptb-word-small")
    bptt = C.load_recipe("ptb-word-small", ["dni.method=bptt"])
    assert dni.dni.method == "dni" and bptt.dni.method == "bptt"
    a, b = dni.to_dict(), bptt.to_dict()
    a["dni"].pop("method"), b["dni"].pop("method")
    for key in ("context", "context_code", "context_steps", "synth_layers", "refit",
                "refit_every", "replay_chunks"):  # DNI's synthesizer, which bptt has not
        a["dni"].pop(key), b["dni"].pop(key)
    assert a == b


def test_sg_push_is_the_old_shipped_raw_push_under_its_own_name():
    push = C.load_recipe("ptb-word-small", ["dni.method=sg-push"])
    raw = C.load_recipe("ptb-word-small", ["dni.target_scale=raw", "dni.sg_scale=0.0125"])
    assert (C.target_scale(push), C.sg_scale(push), C.bootstrap_and_traces(push)) == \
        ("raw", 0.0125, (0.0125, 0.0))
    assert (C.target_scale(raw), C.sg_scale(raw), C.bootstrap_and_traces(raw)[0] or
            C.sg_scale(raw)) == ("raw", 0.0125, 0.0125)
    assert push.dni.sg_cap == raw.dni.sg_cap == 1.0 and push.dni.guard and raw.dni.guard
    dni = C.load_recipe("ptb-word-small")
    assert (C.target_scale(dni), C.sg_scale(dni), C.bootstrap_and_traces(dni)) == \
        ("rms", 0.1, (None, 0.0))


@pytest.mark.parametrize("items, words", [
    (["dni.sg_scale=0.05"], ["sg-push", "dni.push_scale", "dni.method=dni"]),
    (["dni.target_scale=rms", "dni.bootstrap=0.5"], ["sg-push", "dni.bootstrap"]),
    (["dni.sg_cap=0"], ["sg-push", "dni.sg_cap > 0"]),
    (["dni.push_scale=-1"], ["dni.push_scale", ">= 0"]),
])
def test_sg_push_refuses_the_settings_it_sets_itself(items, words):
    with pytest.raises(C.ConfigError) as e:
        C.load_recipe("ptb-word-small", ["dni.method=sg-push"] + items)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


@pytest.mark.parametrize("item, section, key, value", [
    ("train.truncation=5", "train", "truncation", 5),
    ("train.max_tokens=1_000_000", "train", "max_tokens", 1000000),
    ("optim.lr=3e-4", "optim", "lr", 3e-4),
    ("optim.lr=1", "optim", "lr", 1.0),
    ("model.tie_weights=true", "model", "tie_weights", True),
    ("train.progress=no", "train", "progress", False),
    ("dni.bootstrap=0.5", "dni", "bootstrap", 0.5),
    ("dni.bootstrap=none", "dni", "bootstrap", None),
    ("dni.target_scale=sum", "dni", "target_scale", "sum"),
    ("data.data_dir=/x=y", "data", "data_dir", "/x=y"),
])
def test_set_parses_by_field_type(item, section, key, value):
    cfg = C.apply_overrides(C.Config(), [item])
    got = getattr(getattr(cfg, section), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("item, words", [
    ("model.hiden_dim=3", ["model.hiden_dim", "hidden_dim", "num_layers"]),
    ("modle.hidden_dim=3", ["modle", "data", "train"]),
    ("truncation=3", ["section.key"]),
    ("train.truncation", ["section.key=value"]),
    ("train.truncation=3.5", ["train.truncation", "int"]),
    ("train.truncation=abc", ["train.truncation", "int"]),
    ("optim.lr=fast", ["optim.lr", "float"]),
    ("model.tie_weights=maybe", ["model.tie_weights", "bool"]),
    ("dni.method=magic", ["dni.method", "bptt", "dni-aux"]),
])
def test_bad_overrides_fail_in_one_line_naming_the_key(item, words):
    with pytest.raises(C.ConfigError) as e:
        C.apply_overrides(C.Config(), [item])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_validate_catches_cross_field_errors():
    for item in ("dni.bootstrap=2", "train.truncation=0", "model.dropout=1.5",
                 "dni.target_scale=huge", "train.device=tpu"):
        with pytest.raises(C.ConfigError):
            C.validate(C.apply_overrides(C.Config(), [item]))


def test_recipe_files_are_checked(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nhidden = 3\n')
    with pytest.raises(C.ConfigError, match="model.hidden.*hidden_dim"):
        C.load_recipe(bad)
    bad.write_text('[model]\nhidden_dim = "big"\n')
    with pytest.raises(C.ConfigError, match="model.hidden_dim: expected int"):
        C.load_recipe(bad)
    bad.write_text('[modell]\nhidden_dim = 3\n')
    with pytest.raises(C.ConfigError, match="unknown section"):
        C.load_recipe(bad)
    bad.write_text('hidden_dim = 3\n')
    with pytest.raises(C.ConfigError, match="top-level key"):
        C.load_recipe(bad)
    bad.write_text('[model\n')
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load_recipe(bad)
    loop = tmp_path / "loop.toml"
    loop.write_text(f'extends = "{loop}"\n')
    with pytest.raises(C.ConfigError, match="loop"):
        C.load_recipe(loop)
    with pytest.raises(C.ConfigError, match="unknown recipe 'nope'.*ptb-word-small"):
        C.load_recipe("nope")
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_recipe(tmp_path / "missing.toml")


def test_user_recipe_can_extend_a_shipped_one(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('description = "mine"\nextends = "ptb-word-small"\n[train]\ntruncation = 5\n')
    cfg = C.load_recipe(mine, ["optim.lr=0.002"])
    assert cfg.recipe == "mine" and cfg.train.truncation == 5 and cfg.optim.lr == 0.002
    assert cfg.model.hidden_dim == 200


def test_resolved_config_round_trips_through_toml_and_json(tmp_path):
    cfg = C.load_recipe("ptb-char", ["dni.bootstrap=0.3", "train.seed=7"])
    cfg.save(tmp_path)
    again = C.load_recipe(tmp_path / "config.toml")
    a, b = cfg.to_dict(), again.to_dict()
    a.pop("recipe"), b.pop("recipe")
    assert a == b
    none_again = C.load_recipe("ptb-char")
    none_again.save(tmp_path)
    assert C.load_recipe(tmp_path / "config.toml").dni.bootstrap is None
    import json
    assert C.Config.from_dict(json.loads((tmp_path / "config.json").read_text())).to_dict() \
        == none_again.to_dict()


def test_config_keys_cover_every_field():
    keys = {row[0] for row in C.config_keys()}
    for name, cls in C.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"{name}.{f.name}" in keys
            assert f.metadata.get("help")


def test_docs_list_every_config_key():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    missing = [key for key, *_ in C.config_keys() if f"| `{key}` |" not in doc]
    assert not missing, f"docs/training.md lacks {missing}"


def test_a_method_table_applies_to_its_method_only_before_the_command_line(tmp_path):
    """[method.dni] holds dni keys that dni.method=dni reads and the other methods do not;
    --set still wins, and a recipe that extends one can change its table."""
    base = tmp_path / "base.toml"
    base.write_text('description = "b"\nextends = "ptb-word-small"\n[dni]\nsg_scale = 0.2\n'
                    '[method.dni]\nsynth_layers = 0\nrefit = 0.001\n')
    dni_cfg = C.load_recipe(base)
    assert (dni_cfg.dni.synth_layers, dni_cfg.dni.refit, dni_cfg.dni.sg_scale) == (0, 1e-3, 0.2)
    for method in ("bptt", "sg-push"):
        other = C.load_recipe(base, [f"dni.method={method}"] +
                              (["dni.sg_scale=0.1"] if method == "sg-push" else []))
        assert (other.dni.synth_layers, other.dni.refit) == (1, 0.0)
    assert C.load_recipe(base, ["dni.refit=0.01"]).dni.refit == 0.01
    child = tmp_path / "child.toml"
    child.write_text('extends = "base"\n[method.dni]\nrefit = 0.5\n'.replace(
        '"base"', f'"{base}"'))
    assert (C.load_recipe(child).dni.refit, C.load_recipe(child).dni.synth_layers) == (0.5, 0)
    plain_child = tmp_path / "plain_child.toml"  # a file's [dni] outranks inherited tables
    plain_child.write_text(f'extends = "{base}"\n[dni]\nrefit = 0.25\n')
    assert C.load_recipe(plain_child).dni.refit == 0.25
    assert C.load_recipe(plain_child, ["dni.method=bptt"]).dni.refit == 0.25
    smoke = C.load_recipe("ptb-word-small-cdni-smoke")
    assert (smoke.dni.replay_chunks, smoke.dni.refit_every, smoke.dni.sg_scale) == (4, 1, 0.05)
    assert C.load_recipe("ptb-word-small-cdni", ["dni.method=sg-push"]).dni.synth_layers == 1
    bad = tmp_path / "bad.toml"
    for text, words in (('[method.nope]\nrefit = 1\n', "named after a dni.method"),
                        ('[method.dni]\nmethod = "bptt"\n', "cannot set the method"),
                        ('[method.sg-push]\nnope = 1\n', r"\[method.sg-push\].*nope")):
        bad.write_text('description = "x"\n' + text)
        with pytest.raises(C.ConfigError, match=words):
            C.load_recipe(bad)
