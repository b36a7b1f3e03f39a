"""``python -m imgfs ...`` is the same as the ``imgfs`` command."""

import sys

from imgfs.cli import main

sys.exit(main())
