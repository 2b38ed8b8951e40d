"""The application behind the `dni-rnn` command: recipes and their config, tasks (corpora
and the copy tasks wired to a model, a loss and a metric), one training run, checkpoints,
logs, truncation sweeps and the CLI (docs/design.md, "Layers").

It imports the library (`dni_rnn`) and `corpora`; the library never imports it
(tests/test_layers.py). The old paths (`dni_rnn.config`, `dni_rnn.run`, ...) name the same
modules.
"""
