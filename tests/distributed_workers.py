"""What the processes of tests/test_distributed.py run (importable by spawned children)."""
from pathlib import Path

import torch

import dni_rnn as dni
from dni_rnn import distributed
from helpers import TinyLSTMLM, chunk_loss

REPO = Path(__file__).resolve().parent.parent

# runner options per case: plain TBPTT; DNI with the defaults (rms targets, cap, guard);
# exact DNI with raw targets and lambda != beta (a second vector-Jacobian product);
# DNI + Aux with targets in summed-loss units
RUNNER_CASES = {
    "plain": dict(synth=False),
    "dni": dict(synth=True),
    "dni-raw-lambda": dict(synth=True, target_scale="raw", sg_cap=None, guard=False,
                           bootstrap=0.5),
    "dni-aux-sum": dict(synth=True, target_scale="sum", aux=True),
    "dni-calibrate": dict(synth=True, calibrate=True),
}


def runner_problem(world, case, n_steps=36, batch=4, T=4):
    """A float64 TBPTT run on this rank's streams; returns its parameters and losses."""
    opts = dict(RUNNER_CASES[case])
    synth_on, aux_on = opts.pop("synth"), opts.pop("aux", False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_steps, batch, 3, generator=g, dtype=torch.float64)
    y = torch.zeros(n_steps, batch, 2, dtype=torch.float64)
    y[3:] = x[:-3, :, :2]  # recall 3 steps back: a future gradient worth predicting
    resets = torch.zeros(n_steps, batch, dtype=torch.bool)
    resets[9, 0] = resets[17, 3] = resets[22, 1] = True  # state restarts, one stream each
    torch.manual_seed(0)
    model = TinyLSTMLM().double()
    state = (torch.zeros(2, batch, 4, dtype=torch.float64),) * 2
    synth = aux = None
    params = list(model.parameters())
    if synth_on:
        synth = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=1).double()
        params += list(synth.parameters())
    if aux_on:
        aux = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=1).double()
        params += list(aux.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    runner = dni.TBPTTRunner(model, chunk_loss, opt, truncation=T, synthesizer=synth,
                             aux_head=aux, aux_weight=0.1 if aux_on else 0.0,
                             sync=world.gradient_sync(), **opts)
    local = lambda t: world.streams(t, 1)
    state = world.local_state(state)
    _, history = runner.run(local(x), local(y), state, resets=local(resets))
    named = {f"model.{k}": v for k, v in model.state_dict().items()}
    if synth is not None:
        named.update({f"synth.{k}": v for k, v in synth.state_dict().items()})
    return {"params": named, "losses": [m.loss for m in history],
            "synth_loss": [m.synth_loss for m in history],
            "target_rms": [m.target_rms for m in history]}


def runner_cases(cases):
    world = distributed.from_env()
    return {case: runner_problem(world, case) for case in cases}


def train_recipe(recipe, overrides, out_dir, data_dir=None, resume=False, kill_at=None):
    """`training.train` on this rank; `kill_at`: a KeyboardInterrupt before that update."""
    from dni_rnn.config import load_recipe
    from dni_rnn.tbptt import TBPTTRunner
    from dni_rnn.training import train

    original = TBPTTRunner.train_chunk

    def chunk(self, *a, **k):
        if kill_at is not None and self.step + 1 == kill_at:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    TBPTTRunner.train_chunk = chunk
    try:
        return train(load_recipe(recipe, overrides), out_dir=out_dir, resume=resume,
                     data_dir=data_dir, quiet=True)
    except KeyboardInterrupt:
        return "killed"
    finally:
        TBPTTRunner.train_chunk = original


def scenarios(runs):
    """Several runs in the same processes, one process group: [(name, kwargs), ...]."""
    world = distributed.from_env()
    try:
        return {name: train_recipe(**kwargs) for name, kwargs in runs}
    finally:
        world.close()


def everything(cases, runs, pairs, vocab):
    """One launch for the whole test file: the runner cases, the recipe runs, then the
    decoupled two-part runs."""
    world = distributed.from_env()
    try:
        return {"runner": {case: runner_problem(world, case) for case in cases},
                "runs": {name: train_recipe(**kwargs) for name, kwargs in runs},
                "pairs": decoupled_pairs(pairs, vocab)}
    finally:
        world.close()


def markov_streams(n_steps=201, batch=4, vocab=12, seed=0):
    """(N, B) ids of a random first-order Markov chain: something to learn, no download."""
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(vocab, vocab, generator=g).pow(4)
    ids = torch.zeros(n_steps, batch, dtype=torch.long)
    for t in range(1, n_steps):
        ids[t] = torch.multinomial(table[ids[t - 1]], 1, generator=g).squeeze(1)
    return ids


def decoupled_pairs(runs, vocab):
    """Several two-part runs in the same 2 processes: [(name, Options), ...]."""
    from dni_rnn import decoupled

    data = markov_streams(vocab=vocab)
    valid = markov_streams(n_steps=61, batch=2, vocab=vocab, seed=1)
    return {name: decoupled.train_pair(data[:-1], data[1:], valid, vocab, opts)
            for name, opts in runs}
