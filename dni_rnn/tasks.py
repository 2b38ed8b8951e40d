"""Moved to `dni_rnn.app.tasks` (the application layer); this name keeps old imports
working and is the very same module."""
import sys

from .app import tasks as _module

sys.modules[__name__] = _module
