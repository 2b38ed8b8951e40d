"""BP(lambda) across chunk boundaries (dni_rnn/traces.py), exact in float64.

With the synthesizer held fixed (RecordingOptimizer), the synthesizer's gradients summed
over a stream are those of the regression of every M(s_k) onto the lambda-return
G^lambda_k = dL_k/ds_k + gamma J_k^T ((1 - lambda) M(s_{k+1}) + lambda G^lambda_{k+1}):
lambda = 0 is today's bootstrapped target with bootstrap weight gamma, lambda = 1 the
discounted real future gradient through the rest of the stream (full BPTT). Online, for a
linear synthesizer, the updates are those of the accumulating trace
e <- gamma lambda J e + dM/dtheta kept over the synthesizer's parameters.
"""
import io

import pytest
import torch
from torch import nn

import dni_rnn as dni
from dni_rnn.config import ConfigError, bootstrap_and_traces, load_recipe
from dni_rnn.streams import forward_with_resets
from dni_rnn.traces import KeptChunk, flat_streams, state_jacobian
from helpers import EXACT, RecordingOptimizer, boundaries, chunk_loss, make_problem


class LinearRNN(nn.Module):
    """h_{t+1} = A h_t + U x_t, y_t = C h_{t+1}: a tiny linear RNN, state (B, H)."""

    def __init__(self, n_in=2, hidden=3, n_out=2):
        super().__init__()
        self.A = nn.Linear(hidden, hidden, bias=False)
        self.U = nn.Linear(n_in, hidden)
        self.C = nn.Linear(hidden, n_out)

    def forward(self, x, h):
        outs = []
        for t in range(x.shape[0]):
            h = self.A(h) + self.U(x[t])
            outs.append(self.C(h))
        return torch.stack(outs), h


def linear_problem(n_steps=10, batch=3, seed=0):
    torch.manual_seed(seed)
    model = LinearRNN().double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n_steps, batch, 2, generator=g, dtype=torch.float64)
    y = torch.randn(n_steps, batch, 2, generator=g, dtype=torch.float64)
    h = torch.randn(batch, 3, generator=g, dtype=torch.float64)
    return model, x, y, h


def problem(kind):
    if kind == "linear-rnn":
        return linear_problem()
    model, x, y, state = make_problem(n_steps=10)
    return model, x, y, state


def random_linear_synth(state, seed=5):
    """A linear synthesizer over the whole state with random (non-zero) weights."""
    synth = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=0).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in synth.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return synth


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def leaf(state):
    return dni.nest.map_state(lambda t: t.detach().clone().requires_grad_(), state)


def summed_synth_gradients(model, x, y, state, synth, T, gamma, lam, beta=0.3, horizon=32):
    """The runner's synthesizer gradients summed over one stream, nothing moving."""
    n_model = len(list(model.parameters()))
    opt = RecordingOptimizer(list(model.parameters()) + list(synth.parameters()))
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=T, clip=None, synthesizer=synth,
                             sg_scale=beta, bootstrap=gamma, trace_decay=lam,
                             trace_horizon=horizon, **EXACT)
    runner.run(x, y, state=state)
    return opt.total[n_model:], opt.total[:n_model]


def chunk_pieces(model, x, y, state, T):
    """Per chunk k: the boundary state s_k, r_k = dL_k/ds_k and J_k per stream (B, D, D)."""
    s, out = state, []
    for a, b in boundaries(len(x), T):
        s_in = leaf(s)

        def step(*flat_in, a=a, b=b, s_in=s_in):
            new = model(x[a:b], dni.nest.unflatten(s_in, list(flat_in)))[1]
            return tuple(dni.nest.flatten(new))

        ins = tuple(dni.nest.flatten(s_in))
        outputs, new = model(x[a:b], s_in)
        r = torch.autograd.grad(chunk_loss(outputs, y[a:b]), ins)
        full = torch.autograd.functional.jacobian(step, ins)  # [out][in]: out.shape + in.shape
        batch = x.shape[1]
        J = torch.zeros(batch, *(2 * [sum(t.numel() // batch for t in ins)]), dtype=x.dtype)
        for i in range(batch):  # streams are independent: take each stream's block
            rows = []
            for o_idx, o in enumerate(outs_like(new)):
                cols = [per_stream(full[o_idx][i_idx], o, t, i) for i_idx, t in enumerate(ins)]
                rows.append(torch.cat(cols, dim=1))
            J[i] = torch.cat(rows, dim=0)
        out.append((dni.nest.map_state(lambda t: t.detach(), s_in), flat_streams(list(r)), J))
        s = dni.nest.map_state(lambda t: t.detach(), new)
    return out


def outs_like(state):
    return dni.nest.flatten(state)


def per_stream(block, out, inp, i):
    """The (features of out) x (features of inp) Jacobian of stream i, from the full block
    of shape out.shape + inp.shape; the batch is the dimension before the features."""
    bo, bi = out.dim() - 2, inp.dim() - 2
    sub = block.select(bo, i).select(out.dim() - 1 + bi, i)
    return sub.reshape(out.numel() // out.shape[bo], inp.numel() // inp.shape[bi])


def lambda_returns(pieces, messages, gamma, lam):
    """G^lambda_k by its definition, backwards from the stream's end (no future there)."""
    G = [None] * len(pieces)
    for k in reversed(range(len(pieces))):
        r = pieces[k][1]
        if k == len(pieces) - 1:
            G[k] = r
        else:
            ahead = (1 - lam) * messages[k + 1] + lam * G[k + 1]
            G[k] = r + gamma * torch.einsum("boi,bo->bi", pieces[k][2], ahead)
    return G


def regression_gradients(synth, states, targets):
    """Gradients of sum_k |M(s_k) - target_k|^2 / B."""
    loss = 0.0
    for s, target in zip(states, targets):
        m = flat_streams(dni.nest.flatten(synth(s)))
        loss = loss + (m - target).pow(2).sum() / m.shape[0]
    return torch.autograd.grad(loss, list(synth.parameters()))


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `gamma` backward (a discount at a boundary)."""

    @staticmethod
    def forward(ctx, t, gamma):
        ctx.gamma = gamma
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.gamma, None


def discounted_future_gradients(model, x, y, state, T, gamma):
    """Full BPTT over the stream with a discount gamma at every chunk boundary: the gradient
    at s_k is sum_{j>=k} gamma^(j-k) dL_j/ds_k, the Monte-Carlo return."""
    s, kept, total = leaf(state), [], 0.0
    for a, b in boundaries(len(x), T):
        if a > 0:
            s = dni.nest.map_state(lambda t: ScaleGrad.apply(t, gamma), s)
            for t in dni.nest.flatten(s):
                t.retain_grad()
        kept.append(s)
        outputs, s = model(x[a:b], s)
        total = total + chunk_loss(outputs, y[a:b])
    total.backward()
    return [flat_streams([t.grad for t in dni.nest.flatten(k)]) for k in kept]


@pytest.mark.parametrize("kind", ["linear-rnn", "lstm"])
@pytest.mark.parametrize("gamma, lam", [(0.8, 0.0), (0.8, 1.0), (0.7, 0.5), (1.0, 0.3),
                                         (0.5, 1.0)])
def test_summed_updates_regress_onto_the_lambda_return(kind, gamma, lam):
    T = 3
    model, x, y, state = problem(kind)
    synth = random_linear_synth(state)
    got, _ = summed_synth_gradients(model, x, y, state, synth, T, gamma, lam)
    pieces = chunk_pieces(model, x, y, state, T)
    with torch.no_grad():
        messages = [flat_streams(dni.nest.flatten(synth(p[0]))) for p in pieces]
    targets = lambda_returns(pieces, messages, gamma, lam)
    expected = regression_gradients(synth, [p[0] for p in pieces], targets)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear-rnn", "lstm"])
def test_trace_decay_one_regresses_onto_the_discounted_real_future_gradient(kind):
    """lambda = 1: the targets are the Monte-Carlo returns, computed here by full BPTT."""
    T, gamma = 3, 0.8
    model, x, y, state = problem(kind)
    synth = random_linear_synth(state)
    got, _ = summed_synth_gradients(model, x, y, state, synth, T, gamma, 1.0)
    returns = discounted_future_gradients(model, x, y, state, T, gamma)
    states = [p[0] for p in chunk_pieces(model, x, y, state, T)]
    expected = regression_gradients(synth, states, returns)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_trace_decay_zero_is_dni_with_bootstrap_gamma_bit_for_bit():
    """lambda = 0 is today's bootstrapped target with weight gamma: the same updates as DNI
    with bootstrap = gamma, to the last bit (model and synthesizer, with Adam)."""
    results = []
    for lam in (None, 0.0):
        model, x, y, state = make_problem(n_steps=12)
        torch.manual_seed(3)
        synth = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=1).double()
        opt = torch.optim.Adam(list(model.parameters()) + list(synth.parameters()), lr=1e-2)
        kw = {} if lam is None else {"trace_decay": lam}
        runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=3, synthesizer=synth,
                                 bootstrap=0.9, **kw)
        runner.run(x, y, state=state)
        results.append([p.detach().clone() for p in list(model.parameters())
                        + list(synth.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    cfg = load_recipe("copy-smoke", ["dni.method=bp-lambda", "dni.gamma=0.7",
                                     "dni.trace_decay=0"])
    assert bootstrap_and_traces(cfg) == (0.7, 0.0)


def test_traces_change_only_the_synthesizer_gradients():
    model, x, y, state = make_problem(n_steps=10)
    grads = []
    for lam in (0.0, 0.7):
        synth = random_linear_synth(state)
        _, model_grads = summed_synth_gradients(model, x, y, state, synth, 3, 0.9, lam)
        grads.append(model_grads)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_online_updates_equal_the_accumulating_trace_over_the_parameters():
    """With a learning linear synthesizer (SGD) and a fixed model, each update is that of the
    trace e <- gamma lambda J e + dM/dtheta held as a (streams, D, parameters) tensor, the
    form of the public BP(lambda) code, which the runner never builds."""
    T, gamma, lam, lr = 3, 0.9, 0.8, 0.05
    model, x, y, h = linear_problem(n_steps=12)
    synth = random_linear_synth(h)
    W0, b0 = (p.detach().clone() for p in synth.parameters())
    runner = dni.TBPTTRunner(model, chunk_loss, RecordingOptimizer(model.parameters()),
                             truncation=T, clip=None, synthesizer=synth, sg_scale=0.3,
                             bootstrap=gamma, trace_decay=lam,
                             synth_optimizer=torch.optim.SGD(synth.parameters(), lr=lr), **EXACT)
    runner.run(x, y, state=h)

    pieces = chunk_pieces(model, x, y, h, T)  # the model never moves
    W, b = W0, b0
    B, D = h.shape
    eW, eb = torch.zeros(B, D, D, D, dtype=h.dtype), torch.zeros(B, D, D, dtype=h.dtype)
    eye = torch.eye(D, dtype=h.dtype)
    for k, (s, r, J) in enumerate(pieces):
        M = lambda state: state @ W.T + b
        target = r if k == len(pieces) - 1 else \
            r + gamma * torch.einsum("boi,bo->bi", J, M(pieces[k + 1][0]))
        delta = target - M(s)
        if k > 0:  # e <- gamma lambda J_{k-1} e, on the message's index
            Jp = pieces[k - 1][2]
            eW = gamma * lam * torch.einsum("bij,bjpq->bipq", Jp, eW)
            eb = gamma * lam * torch.einsum("bij,bjp->bip", Jp, eb)
        eW = eW + eye[None, :, :, None] * s[:, None, None, :]  # dM_i/dW_pq = [i = p] s_q
        eb = eb + eye[None]
        gW = -2 / B * torch.einsum("bi,bipq->pq", delta, eW)
        gb = -2 / B * torch.einsum("bi,bip->p", delta, eb)
        W, b = W - lr * gW, b - lr * gb
    torch.testing.assert_close(synth.synthesizer.input_trigger.weight, W, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(synth.synthesizer.input_trigger.bias, b, rtol=1e-9, atol=1e-12)


def test_the_horizon_keeps_the_last_chunks_and_a_stream_end_clears_them():
    model, x, y, state = make_problem(n_steps=12)
    synth = random_linear_synth(state)
    opt = RecordingOptimizer(list(model.parameters()) + list(synth.parameters()))
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=2, synthesizer=synth,
                             bootstrap=0.9, trace_decay=1.0, trace_horizon=2, **EXACT)
    walk = runner.walk(x, y, state)
    for _ in range(4):
        next(walk)
    traces = runner.dni.traces
    assert len(traces.entries) == 2
    D = dni.state_dim(state)
    assert traces.keeps_chunks(state)  # D = 16 features > horizon 2: kept as chunks
    start, end = traces.entries[0][2].graph  # run again by the last TD error's pull
    assert state_jacobian(start, end).shape == (3, D, D)
    list(walk)
    assert runner.dni.traces.entries == []  # the stream ended


def test_a_resumed_walk_with_traces_continues_bit_for_bit():
    outs = []
    for cut in (False, True):
        model, x, y, state = make_problem(n_steps=12)
        torch.manual_seed(2)
        synth = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=1).double()
        opt = torch.optim.Adam(list(model.parameters()) + list(synth.parameters()), lr=1e-2)
        runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=3, synthesizer=synth,
                                 bootstrap=0.9, trace_decay=0.8)
        walk = runner.walk(x, y, state)
        for _ in range(2):
            end, state, _ = next(walk)
        if cut:
            saved = runner.state_dict()
            runner.dni.traces.clear()
            runner.load_state_dict(saved)
            walk = runner.walk(x, y, state, start=end)
        list(walk)
        outs.append([p.detach().clone() for p in list(model.parameters())
                     + list(synth.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_a_kept_chunk_runs_again_as_it_ran():
    """Run again after the model has moved, a kept chunk (with dropout and a stream that
    restarts inside it) ends in the same state bit for bit, and pulls a vector back as its
    Jacobian at the parameters of its time does."""
    model, x, y, state = make_problem(n_steps=4)
    model.rnn.dropout = 0.5
    resets = torch.zeros(4, 3, dtype=torch.bool)
    resets[2, 1] = True
    torch.manual_seed(7)
    s = leaf(state)
    chunk = KeptChunk.record(model, x, resets)
    outputs, end, _ = forward_with_resets(model, x, s, resets)
    J = state_jacobian(s, end)
    chunk_loss(outputs, y).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    u = torch.randn(3, dni.state_dim(state), generator=torch.Generator().manual_seed(1),
                    dtype=x.dtype)
    pulled = chunk.pull_back(u, state, model)
    assert all(torch.equal(a, b) for a, b in zip(chunk.graph[1], end))
    torch.testing.assert_close(pulled, torch.einsum("boi,bo->bi", J, u), rtol=1e-12,
                               atol=1e-14)
    assert not pulled[1].any()  # stream 1 restarted: J = 0


def moving_run(synth_kind, jacobians, streams=2):
    """Model and synthesizer learning by SGD over `streams` streams of 13 steps in chunks of 3
    (the last one shorter), stream 1 restarting inside the second chunk and stream 0 inside
    the fourth; traces kept as Jacobians or as chunks. Returns the parameters after it, and
    whether the traces held chunks before each stream's end."""
    model, x, y, state = make_problem(n_steps=13)
    if synth_kind == "gru":
        torch.manual_seed(4)
        synth = dni.RecurrentSynthesizer(dni.state_dim(state), hidden_dim=5).double()
        with torch.no_grad():
            synth.synthesizer.readout.weight.normal_(0, 0.3)
    else:
        synth = random_linear_synth(state)
    resets = torch.zeros(13, 3, dtype=torch.bool)
    resets[4, 1] = resets[10, 0] = True
    opt = torch.optim.SGD(list(model.parameters()) + list(synth.parameters()), lr=0.05)
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=3, clip=None, synthesizer=synth,
                             sg_scale=0.3, bootstrap=0.8, trace_decay=0.9, **EXACT)
    runner.dni.traces.jacobians = jacobians
    kept = []
    for n in range(streams):
        walk = runner.walk(x.roll(n, dims=0), y.roll(n, dims=0), state, resets)
        for _ in range(4):
            next(walk)
        kept.append([isinstance(e[2], KeptChunk) for e in runner.dni.traces.entries])
        list(walk)
        assert runner.dni.traces.entries == []  # the stream ended
    return [p.detach().clone() for p in list(model.parameters()) + list(synth.parameters())], kept


@pytest.mark.parametrize("synth_kind", ["linear", "gru"])
def test_kept_chunks_pull_back_as_the_jacobians_do(synth_kind):
    """BP(lambda) through kept chunks (run again) equals BP(lambda) through their state
    Jacobians to float64 rounding, with the model moving between chunks (so J_i must be taken
    at the parameters of chunk i), streams that restart inside a chunk (J = 0 there) and the
    end of a stream followed by another."""
    by_jacobians, held = moving_run(synth_kind, jacobians=True)
    assert held == [[False] * 4] * 2
    by_chunks, held = moving_run(synth_kind, jacobians=False)
    assert held == [[True] * 4] * 2
    for a, b in zip(by_chunks, by_jacobians):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert not torch.equal(by_chunks[0], make_problem()[0].rnn.weight_ih_l0)  # it learned


class Unnamed(nn.Module):
    """A model that holds its network outside the module tree: `parameters()` lists the
    network's, `named_parameters()` nothing."""

    def __init__(self, net):
        super().__init__()
        self.__dict__["net"] = net

    def forward(self, x, state):
        return self.net(x, state)

    def parameters(self, recurse=True):
        return self.net.parameters()


def test_a_model_that_cannot_run_again_from_its_named_weights_keeps_jacobians():
    model, x, y, state = make_problem(n_steps=9)
    synth = random_linear_synth(state)
    opt = torch.optim.SGD(list(model.parameters()) + list(synth.parameters()), lr=0.05)
    runner = dni.TBPTTRunner(Unnamed(model), chunk_loss, opt, truncation=3, synthesizer=synth,
                             bootstrap=0.9, trace_decay=1.0, trace_horizon=2, **EXACT)
    walk = runner.walk(x, y, state)
    with pytest.warns(UserWarning, match="the traces keep state Jacobians"):
        next(walk)
        next(walk)
    assert [e[2].shape for e in runner.dni.traces.entries] == [(3, 16, 16)] * 2


def test_a_resumed_walk_through_kept_chunks_continues_bit_for_bit():
    """The checkpoint holds the kept chunks (inputs, resets, weights, random-number state),
    which a resumed run runs again as the uninterrupted one does."""
    outs = []
    for cut in (False, True):
        model, x, y, state = make_problem(n_steps=12)
        model.rnn.dropout = 0.3
        torch.manual_seed(2)
        synth = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=1).double()
        opt = torch.optim.Adam(list(model.parameters()) + list(synth.parameters()), lr=1e-2)
        runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=2, synthesizer=synth,
                                 bootstrap=0.9, trace_decay=0.8, trace_horizon=3)
        walk = runner.walk(x, y, state)
        for _ in range(3):
            end, state, _ = next(walk)
        assert all(isinstance(e[2], KeptChunk) for e in runner.dni.traces.entries)  # D=16 > 3
        if cut:
            saved = runner.state_dict()
            torch.save(saved, buffer := io.BytesIO())
            runner.dni.traces.clear()
            runner.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
            walk = runner.walk(x, y, state, start=end)
        list(walk)
        outs.append([p.detach().clone() for p in list(model.parameters())
                     + list(synth.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_bad_settings_are_one_line_errors():
    model, x, y, state = make_problem()
    synth = random_linear_synth(state)
    opt = torch.optim.SGD(list(model.parameters()) + list(synth.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="trace_decay"):
        dni.TBPTTRunner(model, chunk_loss, opt, synthesizer=synth, trace_decay=1.5)
    with pytest.raises(ValueError, match="trace_horizon"):
        dni.TBPTTRunner(model, chunk_loss, opt, synthesizer=synth, trace_decay=0.5,
                        trace_horizon=0)
    for override, key in (("dni.gamma=1.5", "dni.gamma"), ("dni.trace_decay=-1", "dni.trace_decay"),
                          ("dni.trace_horizon=0", "dni.trace_horizon"),
                          ("dni.bootstrap=0.5", "dni.gamma instead")):
        with pytest.raises(ConfigError, match=key):
            load_recipe("copy-smoke", ["dni.method=bp-lambda", override])


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_a_recurrent_synthesizer_learns_by_bp_lambda_through_the_same_interface(lam):
    """A GRU synthesizer's message at s_k reads its memory of s_0 .. s_{k-1} (carried
    detached): the summed updates regress message(s_k, memory_k) onto the lambda-return,
    the Monte-Carlo return of full BPTT at lambda = 1."""
    T, gamma = 3, 0.8
    model, x, y, state = make_problem(n_steps=10)
    torch.manual_seed(4)
    synth = dni.RecurrentSynthesizer(dni.state_dim(state), hidden_dim=5).double()
    with torch.no_grad():
        synth.synthesizer.readout.weight.normal_(0, 0.3)
    got, _ = summed_synth_gradients(model, x, y, state, synth, T, gamma, lam)
    assert synth.memory is None  # the stream ended
    pieces = chunk_pieces(model, x, y, state, T)
    memories, memory = [], torch.zeros(3, 5, dtype=x.dtype)
    for s, _, _ in pieces:
        memories.append(memory)
        memory = synth.synthesizer.cell(flat_streams(dni.nest.flatten(s)), memory).detach()
    message = lambda s, m: flat_streams(dni.nest.flatten(synth.message(s, m)))
    with torch.no_grad():
        messages = [message(p[0], m) for p, m in zip(pieces, memories)]
    if lam == 1.0:
        targets = discounted_future_gradients(model, x, y, state, T, gamma)
    else:
        targets = lambda_returns(pieces, messages, gamma, lam)
    loss = sum((message(p[0], m) - g).pow(2).sum() / 3 for p, m, g in zip(pieces, memories, targets))
    expected = torch.autograd.grad(loss, list(synth.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
