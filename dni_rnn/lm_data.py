"""Moved to `dni_rnn.app.lm_data` (the application layer); this name keeps old imports
working and is the very same module."""
import sys

from .app import lm_data as _module

sys.modules[__name__] = _module
