"""Moved to `dni_rnn.app.run` (the application layer); this name keeps old imports
working and is the very same module."""
import sys

from .app import run as _module

sys.modules[__name__] = _module
