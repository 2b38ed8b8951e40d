"""compare's plan: one Config and directory per (method, T, seed), finished runs reused."""
import json

from dni_rnn.compare import plan
from dni_rnn.config import load_recipe


def test_plan_reuses_a_finished_run_and_lists_the_pending_ones(tmp_path):
    cfg = load_recipe("copy-smoke")
    first = plan(cfg, [2, 3], ["bptt", "dni"], [1], 240, tmp_path, points=3)
    names = ["bptt-T2-s1", "bptt-T3-s1", "dni-T2-s1", "dni-T3-s1"]
    assert first.pending == [tmp_path / n for n in names]
    assert not any(tmp_path.iterdir())  # planning trains nothing
    done = tmp_path / "dni-T2-s1"
    c = first.configs[done]
    assert (c.dni.method, c.train.truncation, c.train.seed) == ("dni", 2, 1)
    assert (c.train.max_tokens, c.train.max_steps, c.train.eval_tokens) == (240, 0, 80)
    # what train leaves in a finished run's directory
    done.mkdir()
    (done / "config.json").write_text(json.dumps(c.to_dict()))
    (done / "summary.json").write_text(json.dumps({"metric": "length", "steps": 30}))
    again = plan(cfg, [2, 3], ["bptt", "dni"], [1], 240, tmp_path, points=3)
    assert again.pending == [tmp_path / n for n in names if n != done.name]
    assert again.summaries[done] == {"metric": "length", "steps": 30}
    assert again.label(done) == "[3/4] dni T=2 seed=1"


def test_plan_loads_the_recipe_per_method_so_its_method_tables_apply(tmp_path):
    """`dni-rnn compare ptb-word-small --methods sg-push,dni` runs what `train --set
    dni.method=M` runs: DNI's cDNI synthesizer ([method.dni]) for dni only."""
    for_method = lambda m: load_recipe("ptb-word-small-smoke", [f"dni.method={m}"])
    planned = plan(for_method, [5], ["sg-push", "dni"], [1], 240, tmp_path)
    push, dni = (planned.configs[tmp_path / f"{m}-T5-s1"] for m in ("sg-push", "dni"))
    assert (push.dni.synth_layers, push.dni.refit, push.dni.context) == (1, 0.0, "none")
    assert (dni.dni.synth_layers, dni.dni.refit, dni.dni.context) == (0, 1e-3, "targets")
