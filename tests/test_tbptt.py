import math

import pytest
import torch
from torch import nn

import dni_rnn as dni
from dni_rnn.streams import forward_with_resets
from helpers import (EXACT, BiasSynthesizer, OracleSynthesizer, RecordingOptimizer, chunk_loss,
                     full_bptt, make_problem)

def lm_loss(logits, targets):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def tiny_lm(seed=0, cell="lstm"):
    torch.manual_seed(seed)
    return dni.RNNLanguageModel(11, embed_dim=6, hidden_dim=6, num_layers=2, cell=cell).double()


def stream(n=23, batch=4, vocab=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n + 1, batch), generator=g)


def test_runner_without_synthesizer_equals_handwritten_tbptt():
    data = stream()
    x, y = data[:-1], data[1:]
    ref = tiny_lm()
    hidden = ref.init_state(4)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for a in range(0, len(x), 5):  # pytorch/examples word_language_model, as users know it
        hidden = tuple(h.detach() for h in hidden)
        ref.zero_grad()
        out, hidden = ref(x[a:a + 5], hidden)
        loss = lm_loss(out, y[a:a + 5])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.25)
        opt.step()

    model = tiny_lm()
    runner = dni.TBPTTRunner(model, lm_loss, torch.optim.SGD(model.parameters(), lr=0.5),
                             truncation=5, clip=0.25)
    _, metrics = runner.run(x, y)
    assert [m.length for m in metrics] == [5, 5, 5, 5, 3]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)
    assert not torch.equal(next(model.parameters()), next(tiny_lm().parameters()))
    assert metrics[-1].synth_loss is None and metrics[0].tokens == 20


@pytest.mark.parametrize("T", [2, 5])
def test_runner_with_oracle_synthesizer_equals_full_bptt(T):
    model, x, y, state = make_problem(n_steps=12)
    reference, values, future = full_bptt(model, x, y, state, T)
    opt = RecordingOptimizer(model.parameters())
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=T, clip=None,
                             synthesizer=OracleSynthesizer(values, future), sg_scale=1.0,
                             **EXACT)
    _, metrics = runner.run(x, y, state=state)
    for g, r in zip(opt.total, reference):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    assert all(m.cosine == pytest.approx(1.0, abs=1e-9) for m in metrics[1:])


def bootstrap_target(lam, beta=0.1, target_scale="raw"):
    """The target the runner's synthesizer is regressed onto at the first trigger."""
    model, x, y, state = make_problem(n_steps=8)
    synth = BiasSynthesizer(state)
    opt = RecordingOptimizer(list(model.parameters()) + list(synth.parameters()))
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=4, clip=None, synthesizer=synth,
                             sg_scale=beta, bootstrap=lam, **{**EXACT, "target_scale": target_scale})
    runner.train_chunk(x[:4], y[:4], state)
    n_model = len(list(model.parameters()))
    scale = runner.dni.scale(4 * 3)
    batch = state[0].shape[1]
    got = [(p.detach() - g * batch / 2) / scale for p, g in zip(synth.biases, opt.total[n_model:])]
    # the autograd definition: dL_k/ds_k + lambda * J_k^T g_hat_{k+1}, g_hat = message / scale
    leaf = tuple(t.clone().requires_grad_() for t in state)
    out, s1 = model(x[:4], leaf)
    g_hat = [p.detach() / scale for p in synth.biases]
    objective = chunk_loss(out, y[:4]) + lam * sum((g * s).sum() for g, s in zip(g_hat, s1))
    return got, torch.autograd.grad(objective, leaf)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 1.0])
def test_bootstrap_target_equals_autograd_definition(lam):
    got, expected = bootstrap_target(lam)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_bootstrap_target_in_summed_loss_units():
    got, expected = bootstrap_target(0.5, target_scale="sum")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_model_gradients_use_beta_not_lambda():
    """The second VJP only changes the synthesizer's target, never the model's gradient."""
    grads = []
    for lam in (0.1, 0.9):
        model, x, y, state = make_problem(n_steps=8)
        synth = BiasSynthesizer(state)
        opt = RecordingOptimizer(list(model.parameters()) + list(synth.parameters()))
        runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=4, clip=None,
                                 synthesizer=synth, sg_scale=0.1, bootstrap=lam, **EXACT)
        runner.train_chunk(x[:4], y[:4], state)
        grads.append(opt.total[: len(list(model.parameters()))])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def copy_weights_lstm(cells, rnn):
    for layer, cell in enumerate(cells):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).data.copy_(getattr(rnn, f"{name}_l{layer}").data)


def test_cell_loop_matches_fused_lstm():
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 5, 2).double()
    cells = [nn.LSTMCell(3, 5).double(), nn.LSTMCell(5, 5).double()]
    copy_weights_lstm(cells, rnn)
    loop = dni.CellLoop(cells)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    h0, c0 = torch.randn(2, 4, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    y1, (h1, c1) = rnn(x, (h0, c0))
    y2, s2 = loop(x, ((h0[0], c0[0]), (h0[1], c0[1])))
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
    torch.testing.assert_close(h1[1], s2[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(c1[0], s2[0][1], rtol=0, atol=1e-12)
    (y1.pow(2).sum() + c1.sum()).backward()
    (y2.pow(2).sum() + s2[0][1].sum() + s2[1][1].sum()).backward()
    for layer, cell in enumerate(cells):
        torch.testing.assert_close(cell.weight_hh.grad, getattr(rnn, f"weight_hh_l{layer}").grad,
                                   rtol=0, atol=1e-12)


def test_custom_gru_cell_matches_fused_gru():
    torch.manual_seed(0)
    rnn = nn.GRU(3, 5, 1).double()
    cell = dni.MinimalGRUCell(3, 5).double()
    cell.ih.weight.data.copy_(rnn.weight_ih_l0.data)
    cell.ih.bias.data.copy_(rnn.bias_ih_l0.data)
    cell.hh.weight.data.copy_(rnn.weight_hh_l0.data)
    cell.hh.bias.data.copy_(rnn.bias_hh_l0.data)
    loop = dni.CellLoop(cell)
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    h0 = torch.randn(1, 2, 5, dtype=torch.float64)
    y1, h1 = rnn(x, h0)
    y2, (h2,) = loop(x, (h0[0],))
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
    torch.testing.assert_close(h1[0], h2, rtol=0, atol=1e-12)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(cell.hh.weight.grad, rnn.weight_hh_l0.grad, rtol=0, atol=1e-12)


def test_custom_cell_trains_with_dni_through_the_runner():
    torch.manual_seed(0)
    core = dni.CellLoop([dni.LayerNormLSTMCell(6, 8), dni.LayerNormLSTMCell(8, 8)])
    model = dni.RNNLanguageModel(11, embed_dim=6, hidden_dim=8, core=core)
    state = model.init_state(4)
    synth = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=1)
    opt = torch.optim.Adam(list(model.parameters()) + list(synth.parameters()), lr=1e-2)
    runner = dni.TBPTTRunner(model, lm_loss, opt, truncation=4, synthesizer=synth)
    data = stream(n=40)
    _, metrics = runner.run(data[:-1], data[1:])
    assert all(math.isfinite(m.loss) for m in metrics)
    assert metrics[-1].synthetic_norm > 0  # the synthesizer left zero and was injected


def test_per_stream_reset_zeroes_only_masked_streams_and_stops_gradient():
    model, x, y, state = make_problem(n_steps=6, batch=3)
    runner = dni.TBPTTRunner(model, chunk_loss, torch.optim.SGD(model.parameters(), lr=0.0))
    resets = torch.zeros(6, 3, dtype=torch.bool)
    resets[3, 1] = True
    leaf = tuple(t.clone().requires_grad_() for t in state)
    out, final, _ = forward_with_resets(model, x, leaf, resets)
    # manual reference: run 3 steps, zero stream 1, run the rest
    o1, s = model(x[:3], state)
    s = tuple(t.clone() for t in s)
    for t in s:
        t[:, 1] = 0
    o2, ref_final = model(x[3:], s)
    torch.testing.assert_close(out, torch.cat([o1, o2]), rtol=0, atol=1e-14)
    torch.testing.assert_close(final[0], ref_final[0], rtol=0, atol=1e-14)
    # the loss after the reset does not reach stream 1's initial state, and does reach stream 0's
    grads = torch.autograd.grad(out[3:].pow(2).sum(), leaf)
    assert all(g[:, 1].abs().max() == 0 for g in grads)
    assert all(g[:, 0].abs().max() > 0 for g in grads)


def test_reset_at_next_chunk_start_masks_the_synthetic_gradient():
    model, x, y, state = make_problem(n_steps=8, batch=3)
    synth = BiasSynthesizer(state)
    opt = RecordingOptimizer(list(model.parameters()) + list(synth.parameters()))
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=4, clip=None, synthesizer=synth,
                             sg_scale=1.0, **EXACT)
    next_resets = torch.tensor([False, True, True])
    runner.train_chunk(x[:4], y[:4], state, next_resets=next_resets)
    with_mask = opt.total[0].clone()
    opt.total = None
    # the same with streams 1 and 2 removed from the synthetic gradient by hand
    for b in synth.biases:
        b.data[:, 1:] = 0
    runner.train_chunk(x[:4], y[:4], state)
    torch.testing.assert_close(with_mask, opt.total[0], rtol=0, atol=1e-15)


def test_bad_inputs_are_clear_errors():
    model = tiny_lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="truncation length"):
        dni.TBPTTRunner(model, lm_loss, opt, truncation=0)
    with pytest.raises(ValueError, match=r"lambda\) must lie in \[0, 1\]"):
        dni.TBPTTRunner(model, lm_loss, opt, bootstrap=1.5)
    synth = dni.StateSynthesizer.mlp(2 * 2 * 6)
    with pytest.raises(ValueError, match="in no optimizer"):
        dni.TBPTTRunner(model, lm_loss, opt, synthesizer=synth)
    runner = dni.TBPTTRunner(model, lm_loss, torch.optim.SGD(
        list(model.parameters()) + list(synth.parameters()), lr=0.1), truncation=3, synthesizer=synth)
    data = stream()
    wrong_state = (torch.zeros(2, 4, 6, dtype=torch.float64),)
    with pytest.raises(ValueError, match="last dimension"):
        runner.run(data[:-1], data[1:], state=wrong_state)
    with pytest.raises(ValueError, match="time-major"):
        runner.run(data[:-1], data[1:-1].T)
    with pytest.raises(ValueError, match="schedule gave"):
        dni.TBPTTRunner(model, lm_loss, opt, truncation=lambda: 0).run(data[:-1], data[1:])


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nan_loss_never_corrupts_parameters(mode):
    model = tiny_lm()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def nan_loss(logits, targets):
        return lm_loss(logits, targets) * float("nan")

    runner = dni.TBPTTRunner(model, nan_loss, opt, truncation=5, on_nonfinite=mode)
    data = stream()
    if mode == "raise":
        with pytest.raises(dni.NonFiniteLossError, match="chunk 0: loss is nan"):
            runner.run(data[:-1], data[1:])
    else:
        _, metrics = runner.run(data[:-1], data[1:])
        assert all(m.skipped for m in metrics)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_random_truncation_is_reproducible_and_resumable():
    a = dni.RandomTruncation(10, seed=3)
    first = [a() for _ in range(5)]
    saved = a.state_dict()
    rest = [a() for _ in range(5)]
    b = dni.RandomTruncation(10, seed=3)
    assert [b() for _ in range(5)] == first
    c = dni.RandomTruncation(10, seed=99)
    c.load_state_dict(saved)
    assert [c() for _ in range(5)] == rest
    assert all(x >= 1 for x in first + rest) and len(set(first + rest)) > 1


def test_aux_objective_equals_its_autograd_definition():
    """DNI + Aux: the model's gradient is that of L + beta <g_hat, s_end> + w * aux, where aux
    regresses the aux head's output at the state after the chunk's first step onto g_hat."""
    model, x, y, state = make_problem(n_steps=8)
    synth = BiasSynthesizer(state)
    torch.manual_seed(5)
    aux = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=1).double()
    nn.init.normal_(aux.synthesizer.output.weight, std=0.1)
    params = list(model.parameters()) + list(synth.parameters()) + list(aux.parameters())
    opt = RecordingOptimizer(params)
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=4, clip=None, synthesizer=synth,
                             sg_scale=0.1, aux_head=aux, aux_weight=0.5, **EXACT)
    _, metrics = runner.train_chunk(x[:4], y[:4], state)
    n_model = len(list(model.parameters()))

    leaf = tuple(t.clone() for t in state)
    out1, s1 = model(x[:1], leaf)
    out2, s4 = model(x[1:4], s1)
    g_hat = [p.detach() for p in synth.biases]
    batch = state[0].shape[1]
    aux_loss = sum((p - g).pow(2).sum() for p, g in zip(aux(s1, None), g_hat)) / batch
    objective = (chunk_loss(torch.cat([out1, out2]), y[:4])
                 + 0.1 * sum((g * s).sum() for g, s in zip(g_hat, s4)) + 0.5 * aux_loss)
    expected = torch.autograd.grad(objective, list(model.parameters()) + list(aux.parameters()))
    got = opt.total[:n_model] + opt.total[n_model + len(g_hat):]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert metrics.aux_loss == pytest.approx(aux_loss.item(), rel=1e-9)


def test_walk_stopped_and_resumed_equals_one_walk():
    """The chunk walk is resumable: stop after two chunks, go on from (end, state) with the
    runner's state dict, and the parameters match an uninterrupted walk bit for bit."""
    data = stream(n=40)
    results = []
    for stop in (None, 2):
        model = tiny_lm()
        synth = dni.StateSynthesizer.mlp(dni.state_dim(model.init_state(1)), n_hidden=1).double()
        opt = torch.optim.Adam(list(model.parameters()) + list(synth.parameters()), lr=1e-2)
        runner = dni.TBPTTRunner(model, lm_loss, opt, truncation=dni.RandomTruncation(6, seed=4),
                                 synthesizer=synth)
        walk = runner.walk(data[:-1], data[1:])
        ends = []
        for k, (end, state, _) in enumerate(walk, start=1):
            ends.append(end)
            if k == stop:
                break
        if stop:
            saved = runner.state_dict()
            runner.load_state_dict(saved)
            ends += [e for e, _, _ in runner.walk(data[:-1], data[1:], state, start=end)]
        results.append(([p.detach().clone() for p in model.parameters()], ends))
    (whole, ends_whole), (resumed, ends_resumed) = results
    assert ends_whole == ends_resumed and ends_whole[-1] == 40 and len(ends_whole) > 3
    for a, b in zip(whole, resumed):
        assert torch.equal(a, b)


class SyncCounter:
    """Counts reads of tensor values into Python (each is a host sync on a GPU)."""

    METHODS = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kwargs):
                self.count += 1
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("kind", ["plain", "dni", "dni-lambda-calibrate-aux"])
def test_a_training_chunk_reads_the_device_once(monkeypatch, kind):
    """Everything the runner decides on in a chunk (the non-finite checks, the target RMS,
    the guard) is read in one host sync; the other metrics stay on the device until read."""
    model = tiny_lm()
    synth = aux = None
    params = list(model.parameters())
    kw = {}
    if kind != "plain":
        synth = dni.StateSynthesizer.mlp(dni.state_dim(model.init_state(1)), n_hidden=1).double()
        params += list(synth.parameters())
    if kind == "dni-lambda-calibrate-aux":
        aux = dni.StateSynthesizer.mlp(dni.state_dim(model.init_state(1)), n_hidden=1).double()
        params += list(aux.parameters())
        kw = dict(bootstrap=0.5, calibrate=True, aux_head=aux, aux_weight=0.1)
    runner = dni.TBPTTRunner(model, lm_loss, torch.optim.SGD(params, lr=0.1), truncation=4,
                             synthesizer=synth, **kw)
    data = stream(n=40)
    walk = runner.walk(data[:-1], data[1:])
    for _ in range(3):  # the target RMS becomes known, the cap and the gate act
        next(walk)
    counter = SyncCounter(monkeypatch)
    held = []
    for _ in range(4):
        _, _, m = next(walk)
        held.append(m)
    assert counter.count == 4
    if kind != "plain":
        assert isinstance(vars(held[0])["cosine"], torch.Tensor)
        assert m.cosine == float(vars(held[-1])["cosine"])  # read on access, as a float
        assert isinstance(m.cosine, float) and isinstance(m.loss, float)
        assert m.capped is not None and m.target_rms > 0
    counter.count = 0
    dni.tbptt.read_metrics(held)  # many chunks' fields in one sync
    assert counter.count == (0 if kind == "plain" else 1)  # plain TBPTT holds none
    assert all(not isinstance(v, torch.Tensor) for h in held for v in vars(h).values())


def test_evaluate_reads_the_losses_once(monkeypatch):
    model = tiny_lm()
    data = stream(n=40)
    expected, _ = dni.evaluate(model, lm_loss, data[:-1], data[1:], chunk_length=7)
    total = 0.0  # the reference: a float64 sum of each chunk's loss times its tokens
    with torch.no_grad():
        state = model.init_state(4)
        for a in range(0, 40, 7):
            out, state = model(data[a:min(a + 7, 40)], state)
            total += lm_loss(out, data[a + 1:min(a + 8, 41)]).item() * out.shape[0] * 4
    assert expected == total / 160
    counter = SyncCounter(monkeypatch)
    dni.evaluate(model, lm_loss, data[:-1], data[1:], chunk_length=7)
    assert counter.count == 1


def test_a_dni_step_object_equals_the_keywords():
    """TBPTTRunner(dni=DNIStep(synth, ...)) and TBPTTRunner(synthesizer=synth, ...) take the
    same updates, bit for bit."""
    data = stream(n=30)
    results = []
    for style in ("keywords", "object"):
        model = tiny_lm()
        torch.manual_seed(7)
        synth = dni.StateSynthesizer.mlp(dni.state_dim(model.init_state(1)), n_hidden=1).double()
        opt = torch.optim.Adam(list(model.parameters()) + list(synth.parameters()), lr=1e-2)
        kw = dict(sg_scale=0.2, bootstrap=0.5, calibrate=True, replay=2)
        if style == "keywords":
            runner = dni.TBPTTRunner(model, lm_loss, opt, truncation=4, synthesizer=synth, **kw)
        else:
            runner = dni.TBPTTRunner(model, lm_loss, opt, truncation=4,
                                     dni=dni.DNIStep(synth, **kw))
        torch.manual_seed(0)
        _, metrics = runner.run(data[:-1], data[1:])
        results.append(([p.detach().clone() for p in model.parameters()],
                        [m.cosine for m in metrics]))
    (a, ca), (b, cb) = results
    assert ca == cb and all(torch.equal(x, y) for x, y in zip(a, b))
