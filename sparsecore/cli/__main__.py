"""``python -m sparsecore.cli``: the ``sparsecore`` command."""
import sys

from .main import main

sys.exit(main())
