"""``python -m attention_hooker``: the same as the ``attention-hooker`` command."""

import sys

from .cli.main import main

sys.exit(main())
