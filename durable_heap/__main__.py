"""``python -m durable_heap``: the same as the ``durable-heap`` command."""

import sys

from .cli import main

sys.exit(main())
