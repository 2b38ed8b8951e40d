"""What a user hits around a run's life: resume with a new budget, bad budgets, a resumed
run's log, a start that fails."""
import json

import pytest

from dni_rnn.cli import main
from dni_rnn.config import ConfigError, load_recipe, validate
from dni_rnn.training import train

TINY = ["model.embed_dim=8", "model.hidden_dim=8", "data.train_tokens=2000",
        "data.valid_tokens=400", "data.test_tokens=400", "train.eval_interval=3",
        "train.log_interval=1", "train.progress=false"]


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_a_new_budget_records_it_and_tests_once_at_the_end(ptb_dir, tmp_path):
    data = str(ptb_dir.parent)
    run = tmp_path / "run"
    first = train(load_recipe("ptb-word-small-smoke", TINY + ["train.max_steps=3"]),
                  out_dir=run, data_dir=data, quiet=True)
    assert first["steps"] == 3 and "test_ppl" in first
    second = train(load_recipe("ptb-word-small-smoke", TINY + ["train.max_steps=6"]),
                   out_dir=run, resume=True, data_dir=data, quiet=True)
    assert second["steps"] == 6
    # the saved config runs again what this run now is
    assert "max_steps = 6" in (run / "config.toml").read_text()
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 6
    tests = [r for r in _records(run) if r.get("split") == "test"]
    assert len(tests) == 1 and tests[0]["step"] == 6 and _records(run)[-1] == tests[0]


@pytest.mark.parametrize("key", ["train.max_steps=-3", "train.max_tokens=-1",
                                 "train.eval_interval=-2", "train.epochs=0"])
def test_negative_budgets_are_clear_errors(key, capsys):
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        validate(load_recipe("copy-smoke", [key]))
    assert main(["train", "copy-smoke", "--set", key, "--out", "/nonexistent/never"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key.split("=")[0] in err[0]


def test_a_start_that_fails_leaves_no_run_directory(tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    run = tmp_path / "run"
    assert main(["train", "ptb-word-small-smoke", "--data-dir", str(empty),
                 "--out", str(run)]) != 0
    assert not run.exists()


def test_the_copy_task_state_keeps_its_last_error():
    from dni_rnn.tasks import CopyTask
    task = CopyTask(load_recipe("copy-smoke"))
    model = task.build_model()
    task.evaluate(model, "valid", "cpu")
    again = CopyTask(load_recipe("copy-smoke"))
    again.load_state_dict(task.state_dict())
    assert again.last_error == task.last_error and again.last_error == again.last_error  # not nan


def test_copy_streams_of_several_episodes_at_random_offsets_resume_the_same_block():
    import torch
    from dni_rnn.tasks import CopyTask
    cfg = load_recipe("copy-smoke", ["task.episodes=3", "task.random_offsets=true"])
    task = CopyTask(cfg)
    first = task.train_stream("cpu")
    assert first.inputs.shape[0] == 3 * 4 and first.resets[0].all()       # N=1: 4 steps each
    assert len({tuple(first.resets[:, s].tolist()) for s in range(32)}) > 1  # phases differ
    saved = task.stream_state()
    second = task.train_stream("cpu")
    assert not torch.equal(first.inputs, second.inputs)
    again = CopyTask(cfg).load_stream_state(saved, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with pytest.raises(ConfigError, match="task.episodes"):
        validate(load_recipe("copy-smoke", ["task.episodes=0"]))


def test_the_alternate_repeat_schedule_lets_r_and_n_take_turns():
    from dni_rnn.tasks import CopyTask
    task = CopyTask(load_recipe("repeat-copy-smoke", ["task.repeat_schedule=alternate",
                                                      "task.max_repeats=2"]))
    shapes = [task.shape(s) for s in range(1, 8)]
    assert shapes == [(1, 1), (2, 1), (2, 2), (3, 2), (3, 2), (4, 2), (4, 2)]  # R capped at 2
    batch = task.episodes(3, 4, None)           # stage 4: N=3, R=2 -> 3 * 3 + 3 steps
    assert batch.inputs.shape[0] == 12 and int(batch.mask[:, 0].sum()) == 3 * 2 + 1
    assert task.metric.label == "last stage solved"
    plain = CopyTask(load_recipe("repeat-copy-smoke"))
    assert plain.shape(4) == (4, 4) and plain.metric.label == "longest length solved"  # min
    with pytest.raises(ConfigError, match="repeat_schedule=alternate"):
        validate(load_recipe("copy-smoke", ["task.repeat_schedule=alternate"]))


def test_the_loss_measure_solves_a_stage_by_the_cross_entropy_per_answer_bit():
    import math
    import torch
    from dni_rnn.tasks import CopyTask

    class Constant(torch.nn.Module):
        """Logit c on every channel: the cross-entropy per bit is known in closed form."""
        def __init__(self, c, d_out):
            super().__init__()
            self.c, self.d_out = c, d_out

        def init_state(self, batch):
            return None

        def forward(self, x, state):
            return torch.full((*x.shape[:2], self.d_out), self.c), state

    cfg = load_recipe("repeat-copy-smoke", ["task.repeat_schedule=alternate",
                                            "task.solve_measure=loss", "task.threshold=1.01"])
    task = CopyTask(cfg)
    result = task.evaluate(Constant(0.0, cfg.task.bits + 1), "valid", "cpu")
    assert result["bits"] == pytest.approx(1.0)      # logit 0: one bit per answer bit
    assert result["length"] == 1 and task.length == 2 and task.shape(task.length) == (2, 1)
    # logit -3 on every channel: -log2 sigmoid(-3) where a target is 1, -log2 sigmoid(3) else
    result = task.evaluate(Constant(-3.0, cfg.task.bits + 1), "valid", "cpu")
    ones = 0.5 * cfg.task.bits * 2 + 1                # ~half the pattern bits, one end marker
    expected = (ones * -math.log2(torch.sigmoid(torch.tensor(-3.0)).item())
                + (3 * (cfg.task.bits + 1) - ones) * -math.log2(torch.sigmoid(torch.tensor(3.0)).item())
                ) / (3 * (cfg.task.bits + 1))
    assert result["bits"] == pytest.approx(expected, rel=0.05)
    assert "stage 2 (N=2, R=1)" in task.result_text(result)
