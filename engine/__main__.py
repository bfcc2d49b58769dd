"""`python -m engine` is the same as the `pocketinfer` command."""

import sys

from engine.cli import main

sys.exit(main())
