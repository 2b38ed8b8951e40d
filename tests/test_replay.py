"""The synthesizer's replay (dni.replay): what it keeps, what it moves, its loss."""
import copy

import pytest
import torch

import dni_rnn as dni
from dni_rnn.config import ConfigError, load_recipe
from helpers import BiasSynthesizer, chunk_loss, make_problem

EXACT = dict(target_scale="raw", sg_cap=None, guard=False, calibrate=False, clip=None)


def runner_for(replay, lr=0.1, synth=None, optimizer=torch.optim.SGD, **kw):
    model, x, y, state = make_problem(n_steps=12)
    synth = synth or dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=1).double()
    opt = optimizer(list(model.parameters()) + list(synth.parameters()), lr=lr)
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=4, synthesizer=synth,
                             sg_scale=0.1, replay=replay, **{**EXACT, **kw})
    return runner, model, synth, x, y, state


def test_the_buffer_holds_the_triggers_and_the_real_gradients_that_reached_them():
    """After a chunk, the buffer holds the state that entered it and the gradient that
    reached it: dL_k/ds_k + beta J_k^T g_hat_{k+1}, the synthesizer's own target."""
    _, _, _, state = make_problem(n_steps=12)
    synth = BiasSynthesizer(state)
    g_hat = [p.detach().clone() for p in synth.biases]  # the message, before any step
    runner, _, _, x, y, state = runner_for(2, synth=synth)
    runner.train_chunk(x[:4], y[:4], state)
    reference, _, _, _ = make_problem(n_steps=12)  # the same model, before its step
    leaf = tuple(t.clone().requires_grad_() for t in state)
    out, s1 = reference(x[:4], leaf)
    objective = chunk_loss(out, y[:4]) + 0.1 * sum((g * s).sum() for g, s in zip(g_hat, s1))
    expected = torch.autograd.grad(objective, leaf)
    buffer = runner.replay
    assert buffer.filled == 1 and buffer.width == 3
    for kept, s in zip(buffer.states, state):
        assert torch.equal(kept[:, :3], s)
    for kept, e in zip(buffer.grads, expected):
        torch.testing.assert_close(kept[:, :3], e, rtol=1e-12, atol=1e-15)


def test_replay_moves_only_the_synthesizer():
    """With one optimizer over model and synthesizer, the replayed updates leave the model
    exactly where the chunk's own update put it; the synthesizer moves on."""
    results = []
    for replay in (0, 3):
        runner, model, synth, x, y, state = runner_for(replay, optimizer=torch.optim.Adam)
        runner.train_chunk(x[:4], y[:4], state)
        results.append(([p.detach().clone() for p in model.parameters()],
                         [p.detach().clone() for p in synth.parameters()]))
    (model0, synth0), (model3, synth3) = results
    for a, b in zip(model0, model3):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(synth0, synth3))


def test_replayed_loss_is_the_regression_loss_at_a_trigger():
    """A replayed minibatch is scored as at a trigger: sum((M(s) - scale g)^2) / streams."""
    buffer = dni.replay.SynthReplay(steps=1, chunks=4)
    g = torch.Generator().manual_seed(0)
    state = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64),
             torch.randn(2, 3, 4, generator=g, dtype=torch.float64))
    grad = tuple(torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    for _ in range(2):
        buffer.add(state, grad)
    synth = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=0).double()
    with torch.no_grad():
        synth.synthesizer.input_trigger.weight.normal_()
    torch.manual_seed(5)
    loss = buffer.regression_loss(synth, 2.0)
    torch.manual_seed(5)
    s, gr = buffer.sample()
    expected = sum((m - 2.0 * t).pow(2).sum() for m, t in zip(synth(s), gr)) / 3
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    # every sampled stream is one that was added: each h row equals one of the kept rows
    rows = {tuple(state[0][:, b].flatten().tolist()) for b in range(3)}
    assert all(tuple(s[0][:, b].flatten().tolist()) in rows for b in range(3))


def test_the_ring_keeps_the_last_chunks_and_samples_only_what_it_holds():
    buffer = dni.replay.SynthReplay(steps=1, chunks=3)
    for k in range(5):
        t = torch.full((1, 2, 1), float(k))
        buffer.add((t,), (t,))
    assert buffer.filled == 3
    assert sorted(set(buffer.states[0].flatten().tolist())) == [2.0, 3.0, 4.0]
    fresh = dni.replay.SynthReplay(steps=1, chunks=8)
    fresh.add((torch.ones(1, 2, 1),), (torch.ones(1, 2, 1),))
    for _ in range(20):  # the empty slots (zeros) are never drawn
        states, _ = fresh.sample()
        assert torch.equal(states[0], torch.ones(1, 2, 1))
    fresh.add((torch.ones(1, 5, 1),), (torch.ones(1, 5, 1),))  # another width: starts again
    assert fresh.filled == 1 and fresh.width == 5


def test_state_dict_round_trip_continues_bit_for_bit():
    outs = []
    for cut in (False, True):
        runner, model, synth, x, y, state = runner_for(2)
        torch.manual_seed(0)
        state, _ = runner.train_chunk(x[:4], y[:4], state)
        if cut:
            saved = runner.state_dict()
            rng = torch.get_rng_state()
            runner.replay.clear()
            runner.load_state_dict(saved)
            torch.set_rng_state(rng)
        runner.train_chunk(x[4:8], y[4:8], state)
        outs.append([p.detach().clone() for p in synth.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_config_refuses_a_negative_replay():
    with pytest.raises(ConfigError, match="dni.replay"):
        load_recipe("copy-smoke", ["dni.replay=-1"])
    with pytest.raises(ValueError, match="replay"):
        dni.replay.SynthReplay(steps=1, chunks=0)


def test_replay_under_torchrun_is_refused_with_one_line(tmp_path):
    from dni_rnn.app.run import Run
    from dni_rnn.distributed import World
    cfg = load_recipe("copy-smoke", ["dni.replay=2", "data.batch_size=4"])
    with pytest.raises(ConfigError, match="dni.replay and dni.refit are not supported under"):
        Run(cfg, tmp_path / "r", world=World(rank=0, size=2)).setup()


@pytest.mark.parametrize("n_hidden,decay", [(0, 1.0), (1, 1.0), (0, 0.6), (1, 0.6)])
def test_refit_solves_the_ridge_regression_on_the_buffer(n_hidden, decay):
    """The refitted last layer (W, b) minimises, over the buffer's rows,
    sum_i w_i ||features_i W^T + b - scale g_i||^2 + ridge * n * ||W * sd||^2, with w_i =
    decay^age of row i's chunk (age 0: the newest), n = sum_i w_i and sd each feature's
    w-weighted standard deviation (divisor n - 1): its gradient there is zero, and the rest
    of the synthesizer is untouched."""
    ridge, scale = 0.05, 2.0
    buffer = dni.replay.SynthReplay(steps=0, chunks=3, ridge=ridge, decay=decay)
    assert buffer  # on with ridge alone: triggers are kept
    g = torch.Generator().manual_seed(1)
    draw = lambda: tuple(torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
                         for _ in range(2))
    synth = dni.StateSynthesizer.mlp(12, n_hidden=n_hidden, hidden_dim=5).double()
    before = {k: v.clone() for k, v in synth.state_dict().items()}
    for _ in range(5):  # the ring keeps the last 3 chunks; a linear synthesizer's refit
        buffer.add(draw(), draw())  # keeps each chunk's sums, and must drop those it evicts
        buffer.refit(synth, scale)
    rows = buffer.filled * buffer.width
    keep = lambda bufs: tuple(b[:, :rows] for b in bufs)
    features, layer = synth.features(keep(buffer.states))
    Y = scale * synth.flatten(keep(buffer.grads))
    W = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    # 5 chunks into a ring of 3: slots 0, 1, 2 hold chunks 3, 4, 2 (chunk 4 the newest)
    age = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    w = (decay ** age).repeat_interleave(buffer.width)[:, None]
    n = w.sum()
    mean = (w * features).sum(0) / n
    sd = ((w * (features - mean) ** 2).sum(0) / (n - 1)).sqrt()
    objective = ((features @ W.T + b - Y).pow(2) * w).sum() + ridge * n * (W * sd).pow(2).sum()
    gW, gb = torch.autograd.grad(objective, (W, b))
    assert gW.abs().max() < 1e-9 * Y.abs().max() * rows and gb.abs().max() < 1e-9 * rows
    changed = {k for k, v in synth.state_dict().items() if not torch.equal(v, before[k])}
    last = "synthesizer.output" if n_hidden else "synthesizer.input_trigger"
    assert changed == {f"{last}.weight", f"{last}.bias"}


@pytest.mark.parametrize("with_context,decay", [(False, 1.0), (True, 1.0), (True, 0.8)])
def test_a_linear_refit_keeps_running_sums_equal_to_the_sums_over_the_buffer(with_context,
                                                                             decay):
    """The running sums of a linear refit, after chunks replaced with and without a refit
    between them, equal the sums over what the buffer holds, each chunk weighted by
    decay^age (to float64 rounding); every `chunks` refits they are recomputed from the
    buffer; a buffer saved and loaded mid-cycle goes on with bit-identical sums."""
    chunks, ridge, scale = 3, 0.05, 2.0
    g = torch.Generator().manual_seed(2)
    draw = lambda: tuple(torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
                         for _ in range(2))
    context = lambda: torch.randn(4, 5, generator=g, dtype=torch.float64) if with_context \
        else None
    synth = dni.StateSynthesizer.mlp(12, n_hidden=0, context_dim=5 if with_context else None)
    synth = synth.double()
    buffer = dni.replay.SynthReplay(steps=0, chunks=chunks, ridge=ridge, decay=decay)
    added = []  # the order chunks were added in, by slot

    def from_scratch():
        rows = buffer.filled * buffer.width
        X = synth.flatten(tuple(b[:, :rows] for b in buffer.states))
        G = synth.flatten(tuple(b[:, :rows] for b in buffer.grads))
        if with_context:
            X = torch.cat([X, buffer.contexts[:rows]], 1)
        age = [len(added) - 1 - max(k for k, slot in enumerate(added) if slot == j)
               for j in range(buffer.filled)]
        w = torch.tensor([decay ** a for a in age], dtype=X.dtype).repeat_interleave(4)[:, None]
        return [(w * X).sum(0), X.T @ (w * X), (w * X).T @ G, (w * G).sum(0)]

    exact_at = []
    for update in range(11):
        added.append(update % chunks)
        buffer.add(draw(), draw(), context())
        if update % 3 == 1:  # two chunks replaced before this refit
            continue
        buffer.refit(synth, scale)
        exact_at.append(buffer.since_exact == 0)
        for kept, expected in zip(buffer.sums, from_scratch()):
            torch.testing.assert_close(kept, expected, rtol=1e-13, atol=1e-13)
    assert exact_at.count(True) >= 2  # recomputed at the start and again after `chunks`
    saved = buffer.state_dict()
    twin = dni.replay.SynthReplay(steps=0, chunks=chunks, ridge=ridge, decay=decay)
    twin.load_state_dict(saved)
    synth_twin = copy.deepcopy(synth)
    for b, s in ((buffer, synth), (twin, synth_twin)):
        torch.manual_seed(9)
        g.manual_seed(9)
        for _ in range(2):
            b.add(draw(), draw(), context())
        b.refit(s, scale)
    for a, b in zip(buffer.sums, twin.sums):
        assert torch.equal(a, b)
    for a, b in zip(synth.parameters(), synth_twin.parameters()):
        assert torch.equal(a, b)


def test_refit_in_training_fits_the_last_chunks_and_resumes_bit_for_bit(tmp_path):
    """In the runner the refit follows every update, on every chunk kept so far; a run
    with it resumes bit for bit (its buffer is in the checkpoint)."""
    runner, model, synth, x, y, state = runner_for(0, refit=1e-3)
    state, _ = runner.train_chunk(x[:4], y[:4], state)
    w = synth.synthesizer.output.weight.detach().clone()
    runner.replay.refit(synth, runner.dni.scale(4 * 3))
    assert torch.equal(w, synth.synthesizer.output.weight)  # already the fit of the buffer
    outs = []
    for cut in (False, True):
        runner, model, synth, x, y, state = runner_for(0, refit=1e-3)
        state, _ = runner.train_chunk(x[:4], y[:4], state)
        if cut:
            saved = runner.state_dict()
            runner.replay.clear()
            runner.load_state_dict(saved)
        runner.train_chunk(x[4:8], y[4:8], state)
        outs.append([p.detach().clone() for p in list(synth.parameters())
                     + list(model.parameters())])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_refit_every_k_updates_refits_on_the_first_and_every_kth_and_resumes_bit_for_bit():
    """refit_every=3: the refit runs after updates 1, 4, 7 (in between the synthesizer
    moves only by its own optimizer); the count travels in checkpoints."""
    buffer = dni.replay.SynthReplay(steps=0, chunks=4, ridge=1e-3, refit_every=3)
    assert [buffer.refit_due() for _ in range(7)] == [True, False, False] * 2 + [True]
    with pytest.raises(ValueError, match="refit_every"):
        dni.replay.SynthReplay(steps=0, ridge=1e-3, refit_every=0)

    def refitted_after_each_update(cut):
        runner, model, synth, x, y, state = runner_for(0, refit=1e-3, refit_every=3)
        out = []
        for k in range(3):
            if cut and k == 2:  # saved after update 2, with the next refit due at update 4
                saved = runner.state_dict()
                runner.replay.clear()
                runner.load_state_dict(saved)
            w = synth.synthesizer.output.weight.detach().clone()
            state, _ = runner.train_chunk(x[4 * k:4 * k + 4], y[4 * k:4 * k + 4], state)
            fitted = synth.synthesizer.output.weight.detach().clone()
            runner.replay.refit(synth, runner.dni.scale(4 * 3))
            out.append((w, fitted, torch.equal(fitted, synth.synthesizer.output.weight)))
            synth.synthesizer.output.weight.data.copy_(fitted)
        return out

    whole, cut = refitted_after_each_update(False), refitted_after_each_update(True)
    assert [is_fit for _, _, is_fit in whole] == [True, False, False]
    for (_, a, _), (_, b, _) in zip(whole, cut):
        assert torch.equal(a, b)


def test_a_buffer_saved_before_the_decay_existed_loads_and_goes_on_alike():
    """A checkpoint without the chunks' add order (before `decay`) loads with the order the
    ring implies and refits exactly as the buffer it was saved from."""
    g = torch.Generator().manual_seed(3)
    draw = lambda: tuple(torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
                         for _ in range(2))
    synth = dni.StateSynthesizer.mlp(12, n_hidden=0).double()
    buffer = dni.replay.SynthReplay(steps=0, chunks=3, ridge=1e-3)
    for k in range(5):
        buffer.add(draw(), draw())
        if k != 3:
            buffer.refit(synth, 1.0)
    buffer.add(draw(), draw())  # one chunk waits to enter the sums, one to leave them
    old = {k: v for k, v in buffer.state_dict().items() if k not in ("added", "added_at",
                                                                     "sums_at")}
    old["leaving"] = [entry[:3] for entry in old["leaving"]]
    twin = dni.replay.SynthReplay(steps=0, chunks=3, ridge=1e-3)
    twin.load_state_dict(old)
    ages = lambda b: [b.added - 1 - a for a in b.added_at]
    assert ages(twin) == ages(buffer)  # the count itself restarts; only ages matter
    synth_twin = copy.deepcopy(synth)
    buffer.refit(synth, 1.0)
    twin.refit(synth_twin, 1.0)
    for a, b in zip(synth.parameters(), synth_twin.parameters()):
        assert torch.equal(a, b)


def test_config_refuses_a_negative_refit():
    with pytest.raises(ConfigError, match="dni.refit"):
        load_recipe("copy-smoke", ["dni.refit=-1"])
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="dni.refit_decay"):
            load_recipe("copy-smoke", [f"dni.refit_decay={bad}"])
    with pytest.raises(ValueError, match="decay"):
        dni.replay.SynthReplay(steps=0, ridge=1e-3, decay=0)
