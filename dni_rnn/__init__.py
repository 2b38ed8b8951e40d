"""dni_rnn: truncated BPTT for recurrent networks with synthetic gradients (DNI).

    import dni_rnn as dni
"""
from . import distributed, nest, replay, traces
from .cells import CellLoop, LayerNormLSTMCell, MinimalGRUCell
from .deferred import DeferredBackward, backward, defer_backward
from .dni_step import DNIStep
from .interfaces import BackwardInterface, BidirectionalInterface, ForwardInterface, TriggerStats
from .models import RNNLanguageModel, SequenceModel
from .synthesizers import (
    BasicSynthesizer,
    RecurrentSynthesizer,
    StateSynthesizer,
    current_context,
    state_dim,
    synthesizer_context,
)
from .tbptt import ChunkMetrics, NonFiniteLossError, TBPTTRunner, evaluate
from .token_context import TokenContext
from .truncation import FixedTruncation, RandomTruncation
from .wrapper import DNI

__version__ = "0.1.0"


def load(path, device="auto"):
    """A trained run in one's own code: its model (eval mode), tokenizer and config.

    Args:
        path: a run directory (its best.pt, else last.pt) or a checkpoint file.
        device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
    Returns:
        `dni_rnn.app.trained.Trained`: `.model`, `.tokenizer` (encode / decode text as
        training did), `.config`, `.state(batch)`.
    Raises:
        CheckpointError, ConfigError: one line saying what is wrong with the file.
    """
    # the one door from the library to the application, opened on call: `import dni_rnn`
    # loads none of it (tests/test_layers.py)
    from .app.trained import load as load_run
    return load_run(path, device=device)


__all__ = [
    "nest", "distributed", "BackwardInterface", "ForwardInterface", "BidirectionalInterface", "TriggerStats",
    "BasicSynthesizer", "StateSynthesizer", "RecurrentSynthesizer", "state_dim", "synthesizer_context",
    "current_context", "DeferredBackward", "defer_backward", "backward",
    "TBPTTRunner", "TokenContext", "DNIStep", "evaluate", "ChunkMetrics", "NonFiniteLossError", "FixedTruncation",
    "RandomTruncation", "RNNLanguageModel", "SequenceModel", "CellLoop",
    "LayerNormLSTMCell", "MinimalGRUCell", "DNI", "load",
]
