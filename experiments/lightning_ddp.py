"""Two processes under Lightning's DDP make the updates of one process (dni_rnn.lightning).

    python experiments/lightning_ddp.py            # prints a table; docs/lightning.md has it

A float64 2-layer LSTM LM on random id streams (8 streams, 4 per rank, with document
starts), plain TBPTT and DNI, trained by `Trainer(strategy="ddp", devices=2,
accelerator="cpu")` in 2 processes (gloo, started as torchrun would by
`dni_rnn.distributed.launch`) and by `Trainer(devices=1)`: the largest difference of any
parameter and of the carried state; and the 2-process run's checkpoint after 8 of 17
updates, resumed in 2 processes (against the straight run) and in 1 (against the 1-process
run; DNI refuses: its running statistics are per rank). It is a script rather than a test
because each process imports Lightning (about 9 s on 2 busy cores).
"""
import copy
import tempfile
import time

import torch
import torch.nn.functional as F

V, B, T, N = 23, 8, 5, 81
DNI = {"sg_scale": 0.1, "bootstrap": 0.5}


def problem():
    import dni_rnn as dni
    torch.manual_seed(0)
    net = dni.RNNLanguageModel(V, 8, 8, 2).double()
    synth = dni.StateSynthesizer.mlp(dni.state_dim(net.init_state(1)), n_hidden=1).double()
    ids = torch.randint(0, V, (N + 1, B))
    resets = torch.zeros(N + 1, B, dtype=torch.bool)
    resets[7, 0] = resets[10, 5] = resets[30, 3] = resets[44, 6] = True
    return net, synth, ids, resets


def train(method, devices, save_to=None, resume=None):
    """Fit one epoch (saving a checkpoint every 4 updates into `save_to`, or going on from
    the checkpoint `resume`); return (parameters, carried state, seconds) on the CPU."""
    import lightning as L

    from dni_rnn.lightning import StreamLoader, TBPTTModule

    net, synth, ids, resets = problem()

    class LM(TBPTTModule):
        def __init__(self):
            super().__init__(truncation=T, dni=DNI if method == "dni" else None)
            self.net = copy.deepcopy(net)

        def forward(self, tokens, state):
            return self.net(tokens, state)

        def init_state(self, batch_size):
            return self.net.init_state(batch_size)

        def chunk_loss(self, logits, targets):
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

        def configure_synthesizer(self):
            return copy.deepcopy(synth)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    module = LM()
    saver = [L.pytorch.callbacks.ModelCheckpoint(save_to, every_n_train_steps=4, save_top_k=-1)]
    trainer = L.Trainer(accelerator="cpu", devices=devices, max_epochs=1,
                        strategy="ddp" if devices > 1 else "auto", precision="64-true",
                        gradient_clip_val=0.5, logger=False, enable_checkpointing=bool(save_to),
                        callbacks=saver if save_to else None, enable_progress_bar=False,
                        enable_model_summary=False)
    started = time.perf_counter()
    trainer.fit(module, StreamLoader.from_ids(ids, resets, length=2 * T), ckpt_path=resume)
    seconds = time.perf_counter() - started
    state = module._world().gather_state(module._train_carry.state) if devices > 1 \
        else module._train_carry.state
    return [p.detach().clone() for p in module.parameters()], state, seconds


def largest_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def main():
    from dni_rnn.distributed import launch

    rows = []
    for method in ("bptt", "dni"):
        with tempfile.TemporaryDirectory() as out:
            one, one_state, one_s = train(method, 1)
            two, two_state, two_s = launch(train, nprocs=2, args=(method, 2, out),
                                           timeout_s=600)[0]
            # the 2-process checkpoint after 8 of 17 updates, resumed in 2 and in 1 process
            ckpt = f"{out}/epoch=0-step=8.ckpt"
            again = launch(train, nprocs=2, args=(method, 2, None, ckpt), timeout_s=600)[0][0]
            try:
                alone = f"{largest_difference(one, train(method, 1, resume=ckpt)[0]):.1e}"
            except ValueError as e:
                alone = f"refused: {e}"
        rows.append(f"| {method} | {largest_difference(one, two):.1e} | "
                    f"{largest_difference(one_state, two_state):.1e} | "
                    f"{largest_difference(two, again):.1e} | {alone} | {one_s:.2f} | {two_s:.2f} |")
    print("| method | 2 processes against 1: parameters | carried state | resumed in 2 processes "
          "against straight | resumed in 1 process | 1 process (s) | 2 processes (s) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
