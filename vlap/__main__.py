"""`python -m vlap ...`: the same as the `vlap` command."""
import sys

from vlap.cli import main

sys.exit(main())
