"""``python -m gpgrad``: the ``gpgrad`` command."""

import sys

from .cli import main

sys.exit(main())
