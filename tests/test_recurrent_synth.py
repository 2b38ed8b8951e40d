"""The recurrent synthesizer (dni.RecurrentSynthesizer, dni.synthesizer=gru): a GRU over the
boundary states of each stream, carried and reset like the model's state, checkpointed.
Its BP(lambda) exactness test is in test_bp_lambda.py."""
import pytest
import torch

import dni_rnn as dni
from dni_rnn import checkpoint as ckpt
from dni_rnn.config import ConfigError, load_recipe
from dni_rnn.tbptt import TBPTTRunner
from dni_rnn.traces import flat_streams
from dni_rnn.training import train
from helpers import EXACT, RecordingOptimizer, chunk_loss, make_problem, run_records


def gru_synth(state, hidden=5):
    torch.manual_seed(4)
    return dni.RecurrentSynthesizer(dni.state_dim(state), hidden_dim=hidden).double()


def frozen_runner(model, synth, T=3, **kw):
    opt = RecordingOptimizer(list(model.parameters()) + list(synth.parameters()))
    return dni.TBPTTRunner(model, chunk_loss, opt, truncation=T, clip=None, synthesizer=synth,
                           **{**EXACT, **kw})


def flat(state):
    return flat_streams(dni.nest.flatten(state))


def test_it_starts_at_zero_so_the_first_chunk_is_plain_tbptt():
    grads = []
    for use_synth in (False, True):
        model, x, y, state = make_problem(n_steps=6)
        synth = gru_synth(state) if use_synth else None
        opt = RecordingOptimizer(list(model.parameters())
                                 + (list(synth.parameters()) if synth else []))
        runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=3, clip=None,
                                 synthesizer=synth, sg_scale=1.0, **EXACT)
        runner.train_chunk(x[:3], y[:3], state)
        grads.append(opt.total[:len(list(model.parameters()))])
        if use_synth:
            assert all(not m.any() for m in synth(state))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_the_memory_is_a_gru_over_the_boundary_states_and_a_stream_end_clears_it():
    model, x, y, state = make_problem(n_steps=12)
    synth = gru_synth(state)
    runner = frozen_runner(model, synth)
    memory, s = torch.zeros(3, 5, dtype=x.dtype), state
    walk = runner.walk(x, y, state)
    for _ in range(3):
        memory = synth.synthesizer.cell(flat(s), memory).detach()
        _, s, _ = next(walk)
        assert torch.equal(synth.memory, memory)
    list(walk)
    assert synth.memory is None


def test_a_stream_that_restarts_inside_a_chunk_forgets_its_memory():
    model, x, y, state = make_problem(n_steps=12)
    resets = torch.zeros(12, 3, dtype=torch.bool)
    resets[4, 1] = True  # stream 1 restarts inside chunk [3, 6)
    synth = gru_synth(state)
    runner = frozen_runner(model, synth)
    walk = runner.walk(x, y, state, resets)
    _, s1, _ = next(walk)
    before = synth.memory.clone()
    _, s2, _ = next(walk)
    expected = synth.synthesizer.cell(flat(s1), before)
    assert not synth.memory[1].any()
    torch.testing.assert_close(synth.memory[[0, 2]], expected[[0, 2]], rtol=0, atol=0)
    next(walk)  # the next boundary is read from an empty memory
    fresh = synth.synthesizer.cell(flat(s2), torch.zeros(3, 5, dtype=x.dtype))
    torch.testing.assert_close(synth.memory[1], fresh[1], rtol=0, atol=0)


def test_dni_with_a_recurrent_synthesizer_has_the_bootstrapped_target_and_learns():
    """The real gradient at a trigger is dL/ds + lambda J^T g_hat, g_hat the message at the
    chunk's end, read with the memory that now includes the trigger."""
    model, x, y, state = make_problem(n_steps=8)
    synth = gru_synth(state)
    with torch.no_grad():
        synth.synthesizer.readout.weight.normal_(0, 0.3)
    memory = synth.memory_for(state)
    # trace_decay > 0 keeps the real gradient at the trigger; the first chunk has no trace
    runner = frozen_runner(model, synth, T=4, sg_scale=0.1, bootstrap=0.5, trace_decay=0.5)
    runner.train_chunk(x[:4], y[:4], state)
    leaf = tuple(t.clone().requires_grad_() for t in state)
    out, s_end = model(x[:4], leaf)
    g_hat = synth.message(tuple(t.detach() for t in s_end),
                          synth.synthesizer.cell(flat(state), memory))
    objective = chunk_loss(out, y[:4]) + 0.5 * sum((g * s).sum() for g, s in zip(g_hat, s_end))
    kept = runner.dni.interface.last_stats.gradients
    for got, expected in zip([kept[i] for i in range(len(kept))],
                             torch.autograd.grad(objective, leaf)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)

    model, x, y, state = make_problem(n_steps=24)
    synth = gru_synth(state)
    opt = torch.optim.Adam(list(model.parameters()) + list(synth.parameters()), lr=1e-2)
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=3, synthesizer=synth)
    _, metrics = runner.run(x, y, state=state)
    assert synth.synthesizer.readout.weight.abs().sum() > 0
    assert all(m.synth_loss is None or m.synth_loss == m.synth_loss for m in metrics)


def test_its_memory_is_part_of_its_state_dict():
    model, x, y, state = make_problem(n_steps=6)
    synth = gru_synth(state)
    runner = frozen_runner(model, synth)
    next(runner.walk(x, y, state))
    saved = synth.state_dict()
    other = gru_synth(state)
    other.load_state_dict(saved)
    assert torch.equal(other.memory, synth.memory)
    assert torch.equal(other(state)[0], synth(state)[0])
    fresh = gru_synth(state)
    fresh.load_state_dict(gru_synth(state).state_dict())  # before any boundary: no memory
    assert fresh.memory is None


def test_wrong_uses_are_one_line_errors(tmp_path):
    model, x, y, state = make_problem()
    synth = gru_synth(state)
    opt = torch.optim.SGD(list(model.parameters()) + list(synth.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="replay and refit need a feed-forward synthesizer"):
        dni.TBPTTRunner(model, chunk_loss, opt, synthesizer=synth, replay=2)
    with pytest.raises(ValueError, match="takes no context"):
        with dni.synthesizer_context(torch.zeros(3)):
            synth(state, torch.zeros(3))
    with pytest.raises(ValueError, match="cannot be refit"):
        synth.features(state)
    with pytest.raises(ConfigError, match="dni.synthesizer=gru cannot replay or refit"):
        load_recipe("copy-smoke", ["dni.synthesizer=gru", "dni.replay=2"])
    with pytest.raises(ConfigError, match="dni.synthesizer must be one of"):
        load_recipe("copy-smoke", ["dni.synthesizer=lstm"])
    from dni_rnn.app.run import Run
    from dni_rnn.distributed import World
    cfg = load_recipe("copy-smoke", ["dni.synthesizer=gru", "data.batch_size=4"])
    with pytest.raises(ConfigError, match="not supported under torchrun"):
        Run(cfg, tmp_path / "r", world=World(rank=0, size=2)).setup()


TINY_COPY = ["model.hidden_dim=8", "data.batch_size=4", "task.eval_sequences=8",
             "train.truncation=3", "train.max_steps=16", "train.eval_interval=5",
             "train.log_interval=1", "train.progress=false", "task.threshold=100",
             "task.episodes=4", "task.random_offsets=true", "dni.synthesizer=gru",
             "dni.synth_hidden=6"]


@pytest.mark.parametrize("method, extra", [("dni", []), ("bp-lambda", []),
                                           ("bp-lambda", ["dni.trace_horizon=4"])])
def test_resume_after_a_kill_is_bit_exact(method, extra, tmp_path, monkeypatch):
    """The GRU's memory (and BP(lambda)'s traces) are in the checkpoint: a run killed after
    its checkpoint of step 10 and resumed equals the uninterrupted run to the last bit. The
    traces keep Jacobians (the state's D = 16 features <= the horizon of 32) or, with a
    horizon of 4, kept chunks, which the resumed run runs again."""
    overrides = TINY_COPY + [f"dni.method={method}"] + extra
    whole = train(load_recipe("copy-smoke", overrides), out_dir=tmp_path / "whole", quiet=True)
    original = TBPTTRunner.train_chunk

    def chunk(self, *a, **k):
        if self.step + 1 == 13:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(TBPTTRunner, "train_chunk", chunk)
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe("copy-smoke", overrides), out_dir=tmp_path / "cut", quiet=True)
    monkeypatch.undo()
    saved = ckpt.load(tmp_path / "cut" / "last.pt")
    assert saved["runner"]["step"] == 10
    assert saved["synthesizer"]["synthesizer._extra_state"]["memory"] is not None
    assert ("traces" in saved["runner"]) == (method == "bp-lambda")
    if extra:
        entries = saved["runner"]["traces"]["entries"]
        assert entries and all("chunk" in e for e in entries)
    again = train(load_recipe("copy-smoke", overrides), out_dir=tmp_path / "cut", resume=True,
                  quiet=True)
    a, b = run_records(tmp_path / "whole"), run_records(tmp_path / "cut")
    assert [r["step"] for r in a] == list(range(1, 17)) == [r["step"] for r in b]
    assert a == b
    assert run_records(tmp_path / "whole", "eval") == run_records(tmp_path / "cut", "eval")
    assert whole["steps"] == again["steps"]
