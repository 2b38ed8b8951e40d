"""Moved to `dni_rnn.app.decoupled` (an experiment of the application layer); this name
keeps old imports and `python -m dni_rnn.decoupled` working and is the very same module."""
import sys

from .app import decoupled as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
