"""``python -m mor.cli``: the ``mor`` command."""

import sys

from . import main

sys.exit(main())
