"""dni_rnn.lightning: under Lightning's Trainer the module makes the runner's very updates
(float64, plain and DNI), resumes from Lightning's checkpoints bit for bit, and the PTB
example and the docs' example run. Skipped where Lightning is not installed."""
import copy
import importlib.util
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO

L = pytest.importorskip("lightning")

import dni_rnn as dni  # noqa: E402
from dni_rnn.lightning import Segment, StreamLoader, TBPTTModule  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*(does not have many workers|LeafSpec|"
                                         "weights_only|smaller than the logging interval|"
                                         "no `val_dataloader`|pre-optimization state|"
                                         "callbacks used to create the checkpoint)")]

V, B, T = 11, 4, 5
DNI = {"sg_scale": 0.1, "bootstrap": 0.5}  # lambda != beta: the second VJP runs too
BP_LAMBDA = {**DNI, "trace_decay": 0.5}    # with a recurrent synthesizer (its memory carried)


def test_import_dni_rnn_loads_no_lightning():
    code = ("import sys, dni_rnn; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def problem(n_steps=41, seed=0, recurrent=False):
    """A float64 2-layer LSTM LM, its synthesizer, id streams (N + 1, B) and document
    starts, two of them on segment boundaries (steps 10 and 20)."""
    torch.manual_seed(seed)
    net = dni.RNNLanguageModel(V, 8, 8, 2).double()
    d = dni.state_dim(net.init_state(1))
    synth = (dni.RecurrentSynthesizer(d) if recurrent else
             dni.StateSynthesizer.mlp(d, n_hidden=1)).double()
    ids = torch.randint(0, V, (n_steps + 1, B))
    resets = torch.zeros(n_steps + 1, B, dtype=torch.bool)
    resets[7, 0] = resets[10, 1] = resets[20, 2] = True
    return net, synth, ids, resets


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class TinyLM(TBPTTModule):
    """The module under test: copies of a given network and synthesizer."""

    def __init__(self, net, synth=None, **kwargs):
        super().__init__(truncation=T, metric="ppl", **kwargs)
        self.net, self._synth = copy.deepcopy(net), synth

    def forward(self, tokens, state):
        return self.net(tokens, state)

    def init_state(self, batch_size):
        return self.net.init_state(batch_size)

    def chunk_loss(self, logits, targets):
        return lm_loss(logits, targets)

    def configure_synthesizer(self):
        return copy.deepcopy(self._synth)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Batches:
    """Given batches as one loader (Lightning reads a list as a list of loaders)."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def trainer(**kwargs):
    settings = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, precision="64-true")
    return L.Trainer(**{**settings, **kwargs})


@pytest.mark.parametrize("method", ["bptt", "dni", "bp-lambda-gru"])
def test_updates_equal_the_runner(method):
    net, synth, ids, resets = problem(recurrent=method == "bp-lambda-gru")
    settings = {"bptt": None, "dni": DNI, "bp-lambda-gru": BP_LAMBDA}[method]
    # clipping as Lightning users set it (plain), or the module's own (DNI)
    module = TinyLM(net, synth, dni=settings, clip=None if settings is None else 0.5)
    fit = trainer(gradient_clip_val=0.5 if settings is None else None)
    fit.fit(module, StreamLoader.from_ids(ids, resets, length=2 * T))

    ref_net, ref_synth = copy.deepcopy(net), copy.deepcopy(synth) if settings else None
    params = [*ref_net.parameters(), *(ref_synth.parameters() if settings else [])]
    runner = dni.TBPTTRunner(ref_net, lm_loss, torch.optim.Adam(params, lr=1e-2), truncation=T,
                             synthesizer=ref_synth, clip=0.5, **(settings or {}))
    _, history = runner.run(ids[:-1], ids[1:], resets=resets[:-1])

    ours = [*module.net.parameters(), *(module.synthesizer.parameters() if settings else [])]
    assert len(ours) == len(params)
    assert max((a - b).abs().max().item() for a, b in zip(ours, params)) <= 1e-10
    assert fit.global_step == len(history) == 9  # one optimizer step per chunk
    if settings:  # the synthesizer took part: it injected something
        assert any(m.injected_norm for m in history)
    assert math.isclose(fit.callback_metrics["train_ppl"].item(),
                        math.exp(fit.callback_metrics["train_loss"].item()))


def test_sequences_of_their_own_per_batch_as_truncated_bptt_steps():
    """Tuple batches, batch-first as a DataLoader collates them: each its own sequences,
    the state fresh at every batch, no synthetic gradient past a batch's end."""
    net, synth, ids, _ = problem(n_steps=24)
    x, y = ids[:-1].T.contiguous(), ids[1:].T.contiguous()  # (B, N): 4 sequences
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    module = TinyLM(net, synth, dni=DNI, batch_first=True)
    trainer().fit(module, loader)

    ref_net, ref_synth = copy.deepcopy(net), copy.deepcopy(synth)
    opt = torch.optim.Adam([*ref_net.parameters(), *ref_synth.parameters()], lr=1e-2)
    runner = dni.TBPTTRunner(ref_net, lm_loss, opt, truncation=T, synthesizer=ref_synth,
                             clip=None, **DNI)
    for xb, yb in loader:
        runner.run(xb.T, yb.T)
    ours = [*module.net.parameters(), *module.synthesizer.parameters()]
    theirs = [*ref_net.parameters(), *ref_synth.parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) <= 1e-10


@pytest.mark.parametrize("recurrent", [False, True], ids=["dni", "dni-gru"])
def test_resume_from_a_lightning_checkpoint_is_bit_identical(tmp_path, recurrent):
    """The GRU synthesizer's memory of the streams is in the module's state_dict."""
    net, synth, ids, resets = problem(recurrent=recurrent)
    settings = DNI
    valid = torch.randint(0, V, (17, 3))

    def fit(module, ckpt_path=None, callbacks=()):
        t = trainer(max_epochs=2, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
        t.fit(module, StreamLoader.from_ids(ids, resets, length=T),
              StreamLoader.from_ids(valid, length=4), ckpt_path=ckpt_path)
        return t

    straight = TinyLM(net, synth, dni=settings)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3,
                                                save_top_k=-1)
    done = fit(straight, callbacks=[saver])
    mid_epoch = tmp_path / "epoch=0-step=6.ckpt"  # 6 of the epoch's 9 chunks trained
    assert mid_epoch.is_file()
    other, _, _, _ = problem(seed=1)  # other weights: all of them must come from the file
    resumed = TinyLM(other, synth, dni=settings)
    again = fit(resumed, ckpt_path=mid_epoch)

    assert again.global_step == done.global_step == 18
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight._train_carry.state, resumed._train_carry.state):
        assert torch.equal(a, b)
    rms = [m._runner_state["target_rms"] for m in (straight, resumed)]
    assert rms[0]["updates"] == rms[1]["updates"] and torch.equal(rms[0]["mean_square"],
                                                                 rms[1]["mean_square"])
    assert done.callback_metrics["val_loss"].item() == again.callback_metrics["val_loss"].item()


def test_one_line_errors(tmp_path):
    net, _, ids, _ = problem()
    with pytest.raises(ValueError, match="unknown DNI setting 'beta'"):
        TinyLM(net, dni={"beta": 0.1})
    loader = StreamLoader.from_ids(ids, length=T)
    shuffled = [loader.segment(i) for i in (0, 2, 1)]
    with pytest.raises(ValueError, match="starts at step 10 but the carried state is at step 5"):
        trainer().fit(TinyLM(net), Batches(shuffled))
    with pytest.raises(ValueError, match="clips the gradient norm only"):
        trainer(gradient_clip_val=1.0, gradient_clip_algorithm="value").fit(TinyLM(net), loader)
    with pytest.raises(ValueError, match=r"gradient_clip_val=1.0\) and TBPTTModule\(clip=0.5"):
        trainer(gradient_clip_val=1.0).fit(TinyLM(net, clip=0.5), loader)
    with pytest.raises(TypeError, match="a TBPTTModule batch is a Segment"):
        trainer().fit(TinyLM(net), Batches([ids]))
    assert isinstance(shuffled[0], Segment)


def test_docs_example_runs():
    text = (REPO / "docs" / "lightning.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/lightning.md", "exec"), {})


def test_ptb_example_smoke(ptb_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("lightning_ptb",
                                                  REPO / "examples" / "lightning_ptb.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--smoke", "--data-dir", str(ptb_dir), "--out", str(tmp_path),
                           "--accelerator", "cpu", "--devices", "1"])
    assert 1000 < result["test_ppl"] < 11000  # 4 updates: still close to the 10k words
    assert math.isclose(result["test_ppl"], math.exp(result["test_loss"]), rel_tol=1e-5)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
