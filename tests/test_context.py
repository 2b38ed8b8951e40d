"""cDNI in the runner: the synthesizer at a boundary conditioned on the data after it."""
import pytest
import torch

import dni_rnn as dni
from dni_rnn.config import ConfigError, load_recipe
from dni_rnn.tbptt import window
from helpers import chunk_loss, make_problem

EXACT = dict(target_scale="raw", sg_cap=None, guard=False, calibrate=False, clip=None)
T, C = 4, 2


class Recording(torch.nn.Module):
    """A StateSynthesizer that notes the context of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, trigger, context=None):
        self.seen.append(None if context is None else context.clone())
        return self.inner(trigger, context)


def context_problem(n_hidden=0, seed=0, **kw):
    model, x, y, state = make_problem(n_steps=12, seed=seed)
    ctx = torch.randn(12, 3, C, generator=torch.Generator().manual_seed(seed + 7),
                      dtype=torch.float64)
    synth = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=n_hidden, hidden_dim=5,
                                     context_dim=T * C).double()
    with torch.no_grad():  # a synthesizer that already says something
        for p in synth.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3),
                                      dtype=p.dtype))
    return model, x, y, state, ctx, synth


def test_window_is_the_steps_after_a_boundary_zero_past_the_end():
    ctx = torch.arange(5 * 2 * 3, dtype=torch.float64).reshape(5, 2, 3)
    w = window(ctx, 3, 4)
    assert w.shape == (2, 12)
    assert torch.equal(w[1, :6], torch.cat([ctx[3, 1], ctx[4, 1]]))
    assert torch.equal(w[:, 6:], torch.zeros(2, 6, dtype=torch.float64))


def test_walk_hands_each_boundary_the_window_after_it():
    """The trigger of chunk [a, b) is scored with the window at a, the synthetic gradient at
    its end is made with the window at b; the last chunk of a stream has no end message."""
    model, x, y, state, ctx, synth = context_problem()
    rec = Recording(synth)
    opt = torch.optim.SGD(list(model.parameters()) + list(synth.parameters()), lr=0.0)
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=T, synthesizer=rec,
                             sg_scale=0.1, **EXACT)
    list(runner.walk(x, y, state, context=ctx))
    expected = [0, 4, 4, 8, 8]  # chunk 0: trigger, end; chunk 1: trigger, end; chunk 2: trigger
    assert len(rec.seen) == len(expected)
    for seen, a in zip(rec.seen, expected):
        assert torch.equal(seen, window(ctx, a, T))


def test_one_chunk_with_a_context_is_exact():
    """float64: the model's gradient is dL/dtheta + beta J_theta^T M(s_b, w_b), the
    synthesizer's the regression of M(s_a, w_a) onto dL/ds_a + lambda J^T M(s_b, w_b)."""
    beta, lam = 0.1, 0.5
    model, x, y, state, ctx, synth = context_problem()
    ref_model, _, _, _ = make_problem(n_steps=12)
    ref_synth = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=0,
                                         context_dim=T * C).double()
    ref_synth.load_state_dict(synth.state_dict())
    opt = torch.optim.SGD(list(model.parameters()) + list(synth.parameters()), lr=1.0)
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=T, synthesizer=synth,
                             sg_scale=beta, bootstrap=lam, **EXACT)
    runner.train_chunk(x[:T], y[:T], state, context=window(ctx, 0, T),
                       next_context=window(ctx, T, T))
    leaf = tuple(t.clone().requires_grad_() for t in state)
    out, s1 = ref_model(x[:T], leaf)
    with torch.no_grad():
        g_hat = ref_synth(s1, window(ctx, T, T))
    loss = chunk_loss(out, y[:T])
    params = list(ref_model.parameters())
    push = sum((g * s).sum() for g, s in zip(g_hat, s1))
    g_model = torch.autograd.grad(loss + beta * push, params, retain_graph=True)
    target = torch.autograd.grad(loss + lam * push, leaf)
    message = ref_synth(state, window(ctx, 0, T))
    synth_loss = sum((m - t).pow(2).sum() for m, t in zip(message, target)) / 3
    g_synth = torch.autograd.grad(synth_loss, list(ref_synth.parameters()))
    for p, p0, g in zip(model.parameters(), ref_model.parameters(), g_model):
        torch.testing.assert_close(p, p0 - g, rtol=1e-12, atol=1e-14)
    for p, p0, g in zip(synth.parameters(), ref_synth.parameters(), g_synth):
        torch.testing.assert_close(p, p0 - g, rtol=1e-12, atol=1e-14)


def test_replay_keeps_each_triggers_context_beside_it():
    buffer = dni.replay.SynthReplay(steps=1, chunks=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        state = tuple(torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
        grad = tuple(torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
        context = state[0].sum(0)  # a function of the stream's own row
        buffer.add(state, grad, context)
    for _ in range(5):
        s, _, c = buffer.sample(with_context=True)
        assert torch.equal(c, s[0].sum(0))
    synth = dni.StateSynthesizer.mlp(16, n_hidden=1, hidden_dim=5, context_dim=4).double()
    torch.manual_seed(5)
    loss = buffer.regression_loss(synth, 2.0)
    torch.manual_seed(5)
    s, gr, c = buffer.sample(with_context=True)
    expected = sum((m - 2.0 * t).pow(2).sum() for m, t in zip(synth(s, c), gr)) / 3
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="streams first"):
        buffer.add(state, grad, torch.zeros(5, 4, dtype=torch.float64))


@pytest.mark.parametrize("n_hidden", [0, 1])
def test_refit_with_a_context_solves_the_ridge_regression_over_state_and_context(n_hidden):
    """A linear synthesizer with a context reads [trigger; context]: the refit's two input
    layers together minimise the standardised ridge objective over the buffer; an MLP's last
    layer does over its features of (trigger, context)."""
    ridge, scale = 0.05, 2.0
    buffer = dni.replay.SynthReplay(steps=0, chunks=3, ridge=ridge)
    g = torch.Generator().manual_seed(1)
    draw = lambda: tuple(torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
                         for _ in range(2))
    synth = dni.StateSynthesizer.mlp(12, n_hidden=n_hidden, hidden_dim=5, context_dim=5).double()
    for _ in range(5):
        buffer.add(draw(), draw(), torch.randn(4, 5, generator=g, dtype=torch.float64))
        buffer.refit(synth, scale)
    rows = buffer.filled * buffer.width
    keep = lambda bufs: tuple(b[:, :rows] for b in bufs)
    Y = scale * synth.flatten(keep(buffer.grads))
    context = buffer.contexts[:rows]
    inner = synth.synthesizer
    if n_hidden:
        features, layer = synth.features(keep(buffer.states), context)
        W, b = layer.weight, layer.bias
    else:
        features = torch.cat([synth.flatten(keep(buffer.states)), context], 1)
        W = torch.cat([inner.input_trigger.weight, inner.input_context.weight], 1)
        b = inner.input_trigger.bias
    W, b = W.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    sd = features.std(0)
    objective = (features @ W.T + b - Y).pow(2).sum() + ridge * rows * (W * sd).pow(2).sum()
    gW, gb = torch.autograd.grad(objective, (W, b))
    assert gW.abs().max() < 1e-9 * Y.abs().max() * rows and gb.abs().max() < 1e-9 * rows
    with torch.no_grad():  # and the synthesizer's own message is that fit
        message = synth.flatten(synth(keep(buffer.states), context))
    torch.testing.assert_close(message, features @ W.detach().T + b.detach(),
                               rtol=1e-10, atol=1e-12)


def test_refit_with_a_context_resumes_bit_for_bit():
    outs = []
    for cut in (False, True):
        model, x, y, state, ctx, synth = context_problem()
        opt = torch.optim.SGD(list(model.parameters()) + list(synth.parameters()), lr=0.1)
        runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=T, synthesizer=synth,
                                 sg_scale=0.1, refit=1e-3, replay=1, **EXACT)
        torch.manual_seed(0)
        walk = runner.walk(x, y, state, context=ctx)
        end, state, _ = next(walk)
        if cut:
            saved, rng = runner.state_dict(), torch.get_rng_state()
            runner.replay.clear()
            runner.load_state_dict(saved)
            torch.set_rng_state(rng)
            walk = runner.walk(x, y, state, start=end, context=ctx)
        list(walk)
        outs.append([p.detach().clone() for p in list(synth.parameters())
                     + list(model.parameters())])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_the_context_must_be_a_stream_beside_the_inputs():
    model, x, y, state, ctx, synth = context_problem()
    opt = torch.optim.SGD(list(model.parameters()) + list(synth.parameters()), lr=0.1)
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=T, synthesizer=synth,
                             sg_scale=0.1, **EXACT)
    with pytest.raises(ValueError, match=r"\(N, B, C\) stream"):
        list(runner.walk(x, y, state, context=ctx[:5]))


def test_config_context_on_the_copy_task_and_refused_elsewhere(tmp_path):
    from dni_rnn.app.run import Run
    cfg = load_recipe("copy-cdni-smoke", ["train.max_steps=30", "train.diagnose_every=10",
                                          "task.start_length=3"])
    assert (cfg.dni.context, cfg.dni.synth_layers, cfg.dni.refit) == ("targets", 0, 1e-3)
    run = Run(cfg, tmp_path / "r", quiet=True).setup()
    assert run.synth.synthesizer.context_dim == cfg.train.truncation * 10  # 8 bits, end, mask
    run.train()
    diagnosed = [l for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
                 if '"diagnose"' in l]
    assert diagnosed
    from dni_rnn.app.training import diagnose_checkpoint  # `dni-rnn diagnose` on the run
    report = diagnose_checkpoint(tmp_path / "r", horizons=(1,), boundaries=2)
    assert report["boundaries"] >= 1 and "cos_k1" in report
    with pytest.raises(ConfigError, match="dni.context"):
        load_recipe("copy-smoke", ["dni.context=targets", "dni.synthesizer=gru"])
    with pytest.raises(ConfigError, match="dni.context"):
        load_recipe("copy-smoke", ["dni.context=labels"])
    refit = ["dni.context=targets", "dni.synth_layers=0", "dni.refit=1e-3"]
    words = load_recipe("ptb-word-small-smoke", refit + ["dni.context_code=onehot",
                                                         "dni.context_steps=0"])
    with pytest.raises(ConfigError, match=r"dni.context=targets gives 35 steps x \d+ = \d+ "
                                          "context features, more than the linear refit's "
                                          "4096; set dni.context_code=decoder"):
        Run(words, tmp_path / "lm", quiet=True, data_dir="../shared/data").setup()
    chars = load_recipe("ptb-char-cdni-smoke", ["dni.context_steps=100"])  # decoder is wider
    with pytest.raises(ConfigError, match=r"more than the linear refit's 4096; lower "
                                          "dni.context_steps$"):
        Run(chars, tmp_path / "lm2", quiet=True, data_dir="../shared/data").setup()


def test_config_context_steps_sets_the_window_past_the_truncation(tmp_path):
    """dni.context_steps=5 at T=3: the synthesizer reads 5 steps of targets after each
    boundary, in training, in the in-training diagnosis and in `dni-rnn diagnose`."""
    from dni_rnn.app.run import Run
    from dni_rnn.app.training import diagnose_checkpoint
    cfg = load_recipe("copy-cdni-smoke", ["train.max_steps=6", "train.diagnose_every=3",
                                          "task.start_length=3", "dni.context_steps=5"])
    run = Run(cfg, tmp_path / "r", quiet=True).setup()
    assert cfg.train.truncation == 3 and run.synth.synthesizer.context_dim == 5 * 10
    run.train()
    assert '"diagnose"' in (tmp_path / "r" / "metrics.jsonl").read_text()
    assert diagnose_checkpoint(tmp_path / "r", horizons=(1,), boundaries=2)["boundaries"] >= 1
    with pytest.raises(ConfigError, match="dni.context_steps must be >= 0"):
        load_recipe("copy-cdni-smoke", ["dni.context_steps=-1"])


def test_a_cdni_run_stopped_and_resumed_equals_the_uninterrupted_one(tmp_path):
    """The replay buffer's contexts travel in the checkpoint: 6 + 6 updates are 12."""
    _stopped_and_resumed_equals_whole(tmp_path, ["task.start_length=3",
                                                 "train.diagnose_every=0"])


def _stopped_and_resumed_equals_whole(tmp_path, over, recipe="copy-cdni-smoke", cut=6,
                                      data_dir=None):
    """Train `recipe` whole and as `cut` updates resumed to the end; both checkpoints."""
    import dni_rnn.app.checkpoint as ckpt
    from dni_rnn.app.training import train
    train(load_recipe(recipe, over), out_dir=tmp_path / "whole", quiet=True, data_dir=data_dir)
    train(load_recipe(recipe, over + [f"train.max_steps={cut}"]), out_dir=tmp_path / "cut",
          quiet=True, data_dir=data_dir)
    train(load_recipe(recipe, over), out_dir=tmp_path / "cut", resume=True, quiet=True,
          data_dir=data_dir)
    whole, cut = (ckpt.load(tmp_path / d / "last.pt") for d in ("whole", "cut"))
    for part in ("model", "synthesizer"):
        for k, v in whole[part].items():
            assert torch.equal(v, cut[part][k]), (part, k)
    return whole


def test_bp_lambda_traces_refuse_a_context_in_one_line():
    model, x, y, state, ctx, synth = context_problem()
    opt = torch.optim.SGD(list(model.parameters()) + list(synth.parameters()), lr=0.1)
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=T, synthesizer=synth,
                             sg_scale=0.1, trace_decay=1.0, **EXACT)
    with pytest.raises(ValueError, match="traces do not support a synthesizer context"):
        list(runner.walk(x, y, state, context=ctx))


def test_refit_data_scores_fits_of_a_frozen_cdni_run(tmp_path):
    """experiments/refit_data.py on a smoke run: boundaries with their context, fits by size,
    and a plain run refused."""
    import json
    import sys
    from conftest import REPO
    from dni_rnn.app.training import train
    sys.path.insert(0, str(REPO / "experiments"))
    import refit_data
    over = ["task.start_length=3", "train.diagnose_every=0", "train.max_steps=4"]
    train(load_recipe("copy-cdni-smoke", over), out_dir=tmp_path / "r", quiet=True)
    out = tmp_path / "fit.json"
    refit_data.main([str(tmp_path / "r"), "--out", str(out), "--blocks", "4",
                     "--chunks", "2,all"])
    report = json.loads(out.read_text())
    assert report["length"] == 3 and report["truncation"] == 3
    assert report["boundaries"] > report["held_out"] > 0
    assert [r["chunks"] for r in report["rows"]][0] == 2
    assert report["rows"][-1]["chunks"] == report["boundaries"] - report["held_out"]
    for row in report["rows"]:
        assert -1 <= row["linear"] <= 1 and -1 <= row["mlp"] <= 1
    refit_data.main([str(tmp_path / "r"), "--out", str(out), "--blocks", "4", "--chunks",
                     "all", "--no-mlp", "--ridges", "0.001,0.1", "--random-features", "16"])
    row, = json.loads(out.read_text())["rows"]
    assert set(row) == {"chunks", "linear", "linear@0.001", "linear@0.1", "rf@16"}
    assert -1 <= row["rf@16"] <= 1 and row["rf@16"] != row["linear"]
    assert row["linear@0.001"] == row["linear"] != row["linear@0.1"]  # the default is 1e-3
    train(load_recipe("copy-smoke", over), out_dir=tmp_path / "plain", quiet=True)
    with pytest.raises(SystemExit, match="not a cDNI run"):
        refit_data.main([str(tmp_path / "plain"), "--out", str(out)])


def test_cosine_csv_reads_the_second_half_and_names_the_synthesizer(tmp_path):
    """experiments/cosine_csv.py: one row per finished run, the diagnosed cosine averaged over
    the second half only, the synthesizer's shape, and unfinished runs left out."""
    import csv
    import statistics
    import sys
    from conftest import REPO
    from dni_rnn.app.training import train
    from dni_rnn.metrics import read_records
    sys.path.insert(0, str(REPO / "experiments"))
    import cosine_csv
    run, over = tmp_path / "cdni", ["task.start_length=3", "train.diagnose_every=2"]
    train(load_recipe("copy-cdni-smoke", over), out_dir=run, quiet=True)
    (tmp_path / "unfinished").mkdir()
    out = tmp_path / "rows.csv"
    cosine_csv.main([str(run), str(tmp_path / "unfinished"), "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1
    row = rows[0]
    assert (row["method"], row["synth"], row["T"]) == ("dni", "linear", "3")
    diag = [r for r in read_records(run) if r.get("kind") == "diagnose" and "cos_k1" in r]
    late = [r["cos_k1"] for r in diag if r["step"] > 12 / 2]
    assert late and len(late) < len(diag) and int(row["n_k1"]) == len(late)
    assert float(row["cos_k1"]) == pytest.approx(statistics.mean(late), abs=1e-4)
    assert int(row["tokens_per_s"]) > 0
    assert row["refit"] == f"{load_recipe('copy-cdni-smoke', over).dni.replay_chunks} chunks"
    assert cosine_csv.refit_name({"method": "dni", "refit": 1e-3, "replay_chunks": 512,
                                  "refit_decay": 0.997}) == "512 chunks, decay 0.997"
    from dni_rnn.app.run import Run
    synth = Run(load_recipe("copy-cdni-smoke", over), run, resume=True, quiet=True).setup().synth
    assert int(row["synth_params"]) == sum(p.numel() for p in synth.parameters()) > 0
    assert cosine_csv.synth_name({"dni": {"synthesizer": "mlp", "synth_layers": 1,
                                          "synth_hidden": 0},
                                  "model": {"cell": "lstm", "hidden_dim": 512,
                                            "num_layers": 1}}) == "mlp 1x1024"


def test_product_features_are_the_states_components_times_the_context():
    """A linear synthesizer with products reads [trigger; context; (z P) x context]: z the
    trigger standardised over the rows its basis was fitted to, P their first principal
    directions. Before any basis is set the products are zero and the message is the
    synthesizer's without them."""
    g = torch.Generator().manual_seed(4)
    plain = dni.StateSynthesizer.mlp(6, n_hidden=0, context_dim=3).double()
    synth = dni.StateSynthesizer.mlp(6, n_hidden=0, context_dim=3, product_rank=2).double()
    inner = synth.synthesizer
    with torch.no_grad():
        for p in synth.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        plain.load_state_dict({k: v for k, v in synth.state_dict().items()
                               if "product" not in k})
    s = torch.randn(5, 6, generator=g, dtype=torch.float64)
    c = torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert torch.equal(synth(s, c), plain(s, c))
    rows = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.arange(1.0, 7.0)
    inner.set_product_basis(rows)
    z = (rows - rows.mean(0)) / rows.std(0)
    values, vectors = torch.linalg.eigh(z.T @ z)
    top = vectors[:, values.argsort(descending=True)[:2]]
    torch.testing.assert_close((inner.product_basis.T @ top).abs(), torch.eye(2, dtype=z.dtype),
                               rtol=0, atol=1e-10)
    zs = (s - rows.mean(0)) / rows.std(0) @ inner.product_basis
    products = (zs[:, :, None] * c[:, None, :]).flatten(1)  # (5, 2 * 3)
    expected = s @ inner.input_trigger.weight.T + inner.input_trigger.bias \
        + c @ inner.input_context.weight.T + products @ inner.input_products.weight.T
    torch.testing.assert_close(synth(s, c), expected, rtol=1e-12, atol=1e-12)
    inner.zero_output_()
    assert not synth(s, c).any()
    with pytest.raises(ValueError, match="product_rank=2 needs a linear synthesizer"):
        dni.StateSynthesizer.mlp(6, n_hidden=1, context_dim=3, product_rank=2)
    with pytest.raises(ValueError, match="product_rank=2 needs a linear synthesizer"):
        dni.StateSynthesizer.mlp(6, n_hidden=0, product_rank=2)


def test_refit_with_products_solves_the_ridge_regression_and_keeps_exact_running_sums():
    """The refit fits the products' basis to the buffered triggers whenever it recomputes
    its sums, and its three input layers together minimise the standardised ridge objective
    over [trigger; context; products]; the running sums between two recomputes equal the
    sums over the buffer's rows with the basis in force."""
    ridge, scale, chunks = 0.05, 2.0, 3
    buffer = dni.replay.SynthReplay(steps=0, chunks=chunks, ridge=ridge)
    g = torch.Generator().manual_seed(1)
    draw = lambda: tuple(torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
                         for _ in range(2))
    synth = dni.StateSynthesizer.mlp(12, n_hidden=0, context_dim=5, product_rank=3).double()
    inner = synth.synthesizer
    bases = []
    for _ in range(8):
        buffer.add(draw(), draw(), torch.randn(4, 5, generator=g, dtype=torch.float64))
        buffer.refit(synth, scale)
        bases.append((inner.product_basis.clone(), buffer.since_exact == 0))
        rows = buffer.filled * buffer.width
        keep = lambda bufs: tuple(b[:, :rows] for b in bufs)
        S, context = synth.flatten(keep(buffer.states)), buffer.contexts[:rows]
        X = torch.cat([S, context, inner.product_features(S, context)], 1)
        G = synth.flatten(keep(buffer.grads))
        for kept, expected in zip(buffer.sums, [X.sum(0), X.T @ X, X.T @ G, G.sum(0)]):
            torch.testing.assert_close(kept, expected, rtol=1e-12, atol=1e-12)
    for (before, _), (after, recomputed) in zip(bases, bases[1:]):  # fitted with the sums
        assert torch.equal(before, after) != recomputed
    assert sum(recomputed for _, recomputed in bases) == 2  # the 1st refit and the 5th
    Y = scale * G
    W = torch.cat([inner.input_trigger.weight, inner.input_context.weight,
                   inner.input_products.weight], 1).detach().clone().requires_grad_()
    b = inner.input_trigger.bias.detach().clone().requires_grad_()
    sd = X.std(0)
    objective = (X @ W.T + b - Y).pow(2).sum() + ridge * rows * (W * sd).pow(2).sum()
    gW, gb = torch.autograd.grad(objective, (W, b))
    assert gW.abs().max() < 1e-9 * Y.abs().max() * rows and gb.abs().max() < 1e-9 * rows
    with torch.no_grad():
        message = synth.flatten(synth(keep(buffer.states), context))
    torch.testing.assert_close(message, X @ W.detach().T + b.detach(), rtol=1e-10, atol=1e-12)


def test_config_products_train_resume_and_are_refused_without_the_linear_refit(tmp_path):
    """dni.products on the cDNI copy recipe: the synthesizer reads the products, the basis
    and running sums travel in the checkpoint (6 + 6 updates are 12), and settings that
    cannot fit them are refused in one line."""
    over = ["task.start_length=3", "train.diagnose_every=0", "dni.products=4"]
    whole = _stopped_and_resumed_equals_whole(tmp_path, over)
    assert whole["synthesizer"]["synthesizer.input_products.weight"].abs().sum() > 0
    assert whole["synthesizer"]["synthesizer.product_basis"].abs().sum() > 0
    import json
    import sys
    from conftest import REPO
    sys.path.insert(0, str(REPO / "experiments"))
    import cosine_csv  # the sweep tables name the synthesizer and count its parameters
    from dni_rnn.app.run import Run
    synth = Run(load_recipe("copy-cdni-smoke", over), tmp_path / "whole", resume=True,
                quiet=True).setup().synth
    assert cosine_csv.synth_parameters(tmp_path / "whole") == \
        sum(p.numel() for p in synth.parameters())
    cfg = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert cosine_csv.synth_name(cfg) == "linear + products 4"
    for bad in (["dni.refit=0"], ["dni.synth_layers=1"], ["dni.context=none"]):
        with pytest.raises(ConfigError, match="dni.products=4 needs the linear refit cDNI"):
            load_recipe("copy-cdni-smoke", ["dni.products=4"] + bad)
    with pytest.raises(ConfigError, match="dni.products must be >= 0"):
        load_recipe("copy-cdni-smoke", ["dni.products=-1"])



def test_a_token_context_is_each_windows_tokens_as_rows_of_its_codes():
    """TokenContext: token ids read as their rows of a code table when a window is taken
    (the table's current values, without gradient), zeros past the stream's end."""
    ids = torch.tensor([[0, 2], [1, 1], [2, 0]])  # (N=3, B=2)
    codes = torch.nn.Parameter(torch.arange(6.0).reshape(3, 2))
    ctx = dni.TokenContext(ids, codes)
    assert ctx.shape == (3, 2, 2) and ctx.dim() == 3
    w = window(ctx, 1, 3)  # steps 1, 2 and one past the end
    assert torch.equal(w, torch.tensor([[2.0, 3, 4, 5, 0, 0], [2, 3, 0, 1, 0, 0]]))
    assert not w.requires_grad
    with torch.no_grad():  # a decoder that has trained since: the next window sees it
        codes.mul_(10)
    assert torch.equal(window(ctx, 2, 1), torch.tensor([[40.0, 50], [0, 10]]))
    both = dni.TokenContext(torch.stack([ids, ids], -1), torch.eye(3))
    assert both.shape == (3, 2, 6) and torch.equal(both[0:1][0, 1], torch.tensor([0.0, 0, 1] * 2))
    with pytest.raises(ValueError, match="integer token ids"):
        dni.TokenContext(ids.float(), codes)
    with pytest.raises(TypeError, match="slices of steps"):
        ctx[0]


@pytest.mark.parametrize("n_hidden", [0, 1])
def test_a_token_stream_trains_as_its_one_hot_stream(n_hidden):
    """float64: walking token ids read through `torch.eye(V)` (windows reaching past the end
    included, with replay) gives the same model and synthesizer as walking their one-hot
    float stream, to the last bit."""
    V, steps = 3, 6
    results = []
    for tokens in (True, False):
        model, x, y, state = make_problem(n_steps=12)
        ids = torch.randint(0, V, (12, 3), generator=torch.Generator().manual_seed(2))
        ctx = (dni.TokenContext(ids, torch.eye(V, dtype=torch.float64)) if tokens
               else torch.nn.functional.one_hot(ids, V).double())
        synth = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=n_hidden, hidden_dim=5,
                                         context_dim=steps * V).double()
        with torch.no_grad():
            for p in synth.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3),
                                          dtype=p.dtype))
        opt = torch.optim.SGD(list(model.parameters()) + list(synth.parameters()), lr=0.1)
        runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=T, synthesizer=synth,
                                 sg_scale=0.1, bootstrap=0.5, replay=1, **EXACT)
        torch.manual_seed(0)
        list(runner.walk(x, y, state, context=ctx, context_steps=steps))
        results.append([p.detach().clone() for m in (model, synth) for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("recipe, code", [("ptb-char-cdni-smoke", "onehot"),
                                          ("ptb-word-small-cdni-smoke", "decoder")])
def test_config_context_on_a_language_model_trains_diagnoses_and_resumes(tmp_path, recipe, code):
    """dni.context=targets on a language model (the recipes ptb-char-cdni and
    ptb-word-small-cdni): the synthesizer reads the next T tokens, one-hot (characters) or as
    the model's decoder rows (words), in training, in the diagnosis and in `dni-rnn
    diagnose`; a run stopped and resumed equals the whole one."""
    from dni_rnn.app.run import Run
    from dni_rnn.app.training import diagnose_checkpoint
    cfg = load_recipe(recipe)
    assert (cfg.dni.context, cfg.dni.context_code, cfg.train.truncation) == ("targets", code, 5)
    run = Run(cfg, tmp_path / "r", quiet=True, data_dir="../shared/data").setup()
    per_token = len(run.task.vocab) if code == "onehot" else cfg.model.hidden_dim
    assert run.synth.synthesizer.context_dim == 5 * per_token
    _stopped_and_resumed_equals_whole(tmp_path, [], recipe=recipe, cut=3,
                                      data_dir="../shared/data")
    assert '"diagnose"' in (tmp_path / "whole" / "metrics.jsonl").read_text()
    report = diagnose_checkpoint(tmp_path / "whole", horizons=(1,), boundaries=2,
                                 data_dir="../shared/data")
    assert report["boundaries"] >= 1 and "cos_k1" in report
    with pytest.raises(ConfigError, match="dni.context_code=decoder encodes a language model"):
        load_recipe("copy-cdni-smoke", ["dni.context_code=decoder"])


def test_the_word_cdni_recipe_is_the_measured_command():
    """docs/RESULTS.md's ptb-word-small cDNI rows were made with ptb-word-small and these
    --set lines (beta = lambda = 0.1 until 2026-12-05, 0.05 since); the recipe is the same
    configuration at 0.05, and the first rows are one --set away."""
    sets = ["train.epochs=1", "train.truncation=5", "train.diagnose_every=200",
            "dni.context=targets", "dni.synth_layers=0", "dni.refit=1e-3",
            "dni.replay_chunks=256", "dni.context_code=decoder", "dni.refit_every=10"]
    measured = load_recipe("ptb-word-small", sets + ["dni.sg_scale=0.05"])
    recipe = load_recipe("ptb-word-small-cdni")
    for part in ("data", "model", "optim", "train", "dni"):
        assert getattr(recipe, part) == getattr(measured, part), part
    first = load_recipe("ptb-word-small-cdni", ["dni.sg_scale=0.1"])
    assert first.dni == load_recipe("ptb-word-small", sets).dni


def test_context_ceiling_fits_a_frozen_language_model_with_and_without_its_next_tokens(tmp_path):
    """experiments/context_ceiling.py on ptb-char-smoke: the windows the runner would read,
    ridge fits scored on held-out boundaries; the next tokens predict more than the state."""
    import json
    import sys
    from conftest import REPO
    sys.path.insert(0, str(REPO / "experiments"))
    import context_ceiling
    out = tmp_path / "c"
    context_ceiling.main(["ptb-char-smoke", "--out", str(out), "--data-dir", "../shared/data",
                          "--boundaries", "60", "--products", "2", "--set", "dni.method=bptt",
                          "--set", "train.truncation=5"])
    report = json.loads((out / "context-ceiling.json").read_text())
    assert report["boundaries"] == 60 and report["held_out"] == 12
    cos = {r["fit"]: r["cos_k1"] for r in report["rows"]}
    assert set(cos) == {"state", "state + context", "first token only",
                        "state + context + products 2"}
    assert all(-1 <= c <= 1 for c in cos.values())
    assert cos["state + context"] > cos["state"] + 0.1


@pytest.mark.parametrize("n_hidden", [0, 1])
def test_between_refits_the_refitted_layer_keeps_the_refits_solution(n_hidden):
    """With dni.refit_every > 1 the optimizer used to move the refitted layer between refits,
    off the ridge solution (on PTB words it doubled the synthesizer's output and halved its
    cosine; docs/dni.md, point 16). Now only the refit moves it; an MLP's hidden layers
    still learn by gradient."""
    model, x, y, state, ctx, synth = context_problem(n_hidden=n_hidden)
    opt = torch.optim.Adam(list(model.parameters()) + list(synth.parameters()), lr=0.01)
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=T, synthesizer=synth,
                             sg_scale=0.1, refit=1e-3, refit_every=2, **EXACT)
    refitted = synth.refitted_parameters()
    others = [p for p in synth.parameters() if all(p is not q for q in refitted)]
    assert bool(others) == bool(n_hidden) and all(not p.requires_grad for p in refitted)
    seen = []
    for _ in runner.walk(x, y, state, context=ctx):
        seen.append(([p.detach().clone() for p in refitted],
                     [p.detach().clone() for p in others]))
    (fit1, hid1), (same1, hid2), (fit2, _) = seen
    assert all(torch.equal(a, b) for a, b in zip(fit1, same1))      # update 2: no refit
    assert not all(torch.equal(a, b) for a, b in zip(same1, fit2))  # update 3: refitted
    assert all(p not in opt.state for p in refitted)
    assert n_hidden == 0 or not all(torch.equal(a, b) for a, b in zip(hid1, hid2))


def test_the_word_recipe_at_T35_is_the_measured_command():
    """docs/RESULTS.md's T=35 cDNI rows were made with ptb-word-small-cdni and these --set
    lines; they are ptb-word-small's DNI, one epoch, diagnosed."""
    measured = load_recipe("ptb-word-small-cdni", [
        "train.truncation=35", "dni.context_steps=5", "train.diagnose_every=25",
        "dni.sg_scale=0.1"])
    recipe = load_recipe("ptb-word-small", ["train.epochs=1", "train.diagnose_every=25"])
    for part in ("data", "model", "optim", "train", "dni"):
        assert getattr(recipe, part) == getattr(measured, part), part
