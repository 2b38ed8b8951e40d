"""optim.kernel: torch's multi-tensor (foreach) and fused optimizer steps, opt-in."""
import pytest
import torch

from dni_rnn.app.run import build_optimizers
from dni_rnn.config import ConfigError, load_recipe
from dni_rnn.synthesizers import StateSynthesizer


def _steps(kernel, name, synth_lr):
    cfg = load_recipe("copy-smoke", [f"optim.kernel={kernel}", f"optim.name={name}",
                                     f"dni.synth_lr={synth_lr}", "optim.weight_decay=1e-4"])
    torch.manual_seed(0)
    model = torch.nn.LSTM(3, 8)
    synth = StateSynthesizer.mlp(16, n_hidden=1, hidden_dim=8)
    torch.nn.init.normal_(synth.synthesizer.output.weight)
    optimizer, synth_optimizer = build_optimizers(cfg, model, synth, None)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        out, (h, c) = model(torch.randn(4, 2, 3, generator=g))
        m = synth((h, c))
        (out.pow(2).sum() + sum(t.pow(2).sum() for t in m)).backward()
        for o in (optimizer, synth_optimizer):
            if o is not None:
                o.step()
                o.zero_grad()
    return optimizer, synth_optimizer, [p.detach().clone() for p in
                                         list(model.parameters()) + list(synth.parameters())]


@pytest.mark.parametrize("name,synth_lr", [("adam", 0.0), ("adam", 1e-3), ("sgd", 1e-3)])
@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_the_kernels_give_the_default_update_to_rounding(kernel, name, synth_lr):
    optimizer, synth_optimizer, got = _steps(kernel, name, synth_lr)
    for o in (optimizer, synth_optimizer):
        if o is not None:
            assert o.defaults[kernel] is True
    _, _, want = _steps("auto", name, synth_lr)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_unknown_kernel_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="optim.kernel"):
        load_recipe("copy-smoke", ["optim.kernel=cuda-graphs"])
