"""dni_rnn: truncated BPTT for recurrent networks with synthetic gradients (DNI).

    import dni_rnn as dni
"""
from . import nest
from .deferred import DeferredBackward, backward, defer_backward
from .interfaces import BackwardInterface, BidirectionalInterface, ForwardInterface, TriggerStats
from .synthesizers import (
    BasicSynthesizer,
    StateSynthesizer,
    current_context,
    state_dim,
    synthesizer_context,
)

__version__ = "0.1.0"
