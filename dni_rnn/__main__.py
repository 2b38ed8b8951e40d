"""`python -m dni_rnn ...` is the `dni-rnn` command."""
import sys

from .cli import main

sys.exit(main())
