"""``python -m sande_fast`` is the ``sande-fast`` command."""
import sys

from .cli import main

sys.exit(main())
