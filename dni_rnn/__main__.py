"""`python -m dni_rnn ...` is the `dni-rnn` command."""
import sys

from .app.cli import main

sys.exit(main())
