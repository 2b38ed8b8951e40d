"""dni_rnn: truncated BPTT for recurrent networks with synthetic gradients (DNI).

    import dni_rnn as dni
"""
from . import distributed, nest, replay
from .cells import CellLoop, LayerNormLSTMCell, MinimalGRUCell
from .deferred import DeferredBackward, backward, defer_backward
from .dni_step import DNIStep
from .interfaces import BackwardInterface, BidirectionalInterface, ForwardInterface, TriggerStats
from .models import RNNLanguageModel, SequenceModel
from .synthesizers import (
    BasicSynthesizer,
    StateSynthesizer,
    current_context,
    state_dim,
    synthesizer_context,
)
from .tbptt import ChunkMetrics, NonFiniteLossError, TBPTTRunner, evaluate
from .truncation import FixedTruncation, RandomTruncation
from .wrapper import DNI

__version__ = "0.1.0"

__all__ = [
    "nest", "distributed", "BackwardInterface", "ForwardInterface", "BidirectionalInterface", "TriggerStats",
    "BasicSynthesizer", "StateSynthesizer", "state_dim", "synthesizer_context",
    "current_context", "DeferredBackward", "defer_backward", "backward",
    "TBPTTRunner", "DNIStep", "evaluate", "ChunkMetrics", "NonFiniteLossError", "FixedTruncation",
    "RandomTruncation", "RNNLanguageModel", "SequenceModel", "CellLoop",
    "LayerNormLSTMCell", "MinimalGRUCell", "DNI",
]
