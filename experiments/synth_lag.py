"""How fast does the future gradient move while the model trains? (issue 19)

Trains a recipe (plain updates of the model; the synthesizer, if any, as configured) and
keeps copies of the model at a reference step and at steps after it. For each copy the
same fresh blocks give boundaries with the exact future gradient g_1
(`synth_ceiling.collect`). A synthesizer fitted offline to the reference copy's boundaries
(the best a synthesizer can do with a frozen model) is then scored on the later copies:
the cosine it keeps after the model took D more updates says how long a fitted
synthesizer stays right.

    python experiments/synth_lag.py demo --ref 1000 --set dni.sg_scale=0 --set optim.lr=1e-3
"""
import argparse
import copy

import torch

import synth_ceiling as sc  # this folder (the script's own) is on sys.path
from dni_rnn.config import load_recipe, validate  # noqa: E402
from dni_rnn.run import Run  # noqa: E402

LAGS = (0, 1, 3, 10, 30, 100, 300)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ref", type=int, default=1000)
    ap.add_argument("--blocks", type=int, default=200)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_recipe(args.recipe, args.overrides + ["train.progress=false",
                                                     f"train.max_steps={args.ref + max(LAGS)}"])
    validate(cfg)
    run = Run(cfg, args.out, quiet=True).setup()
    snaps, after = {}, run._after_chunk

    def hook(m):
        if run.step - args.ref in LAGS:
            snaps[run.step - args.ref] = copy.deepcopy(run.model.state_dict())
        return after(m)
    run._after_chunk = hook
    run.train()
    length = run.task.length
    data = {}
    for lag, sd in sorted(snaps.items()):
        run.model.load_state_dict(sd)
        run.task.curriculum.value = length
        data[lag] = sc.collect(run, args.blocks)
    ref = data[0]
    cut = int(0.8 * len(ref))
    fit = sc.fit_mlp(ref[:cut], 1, 1, 256, standardise=True, online=False, lr=1e-3)
    lin = sc.fit_linear(ref[:cut], 1)
    print(f"N={length}, {len(ref)} boundaries per copy; cosine with g_1 of a synthesizer "
          f"fitted at step {args.ref}, scored D updates later (held-out blocks)")
    for lag, d in sorted(data.items()):
        held = d[cut:]
        print(f"D={lag:>4}  MLP cos={sc.score(fit, held)['cos_k1']:+.3f}  "
              f"linear cos={sc.score(lin, held)['cos_k1']:+.3f}")


if __name__ == "__main__":
    main()
