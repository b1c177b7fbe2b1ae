"""``python -m flowprobe.cli`` (what ``torchrun ... -m flowprobe.cli train`` runs)."""

import sys

from . import main

sys.exit(main())
