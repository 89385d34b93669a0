"""``python -m fsmoe.cli ...`` == ``fsmoe ...`` (torchrun workers start this way)."""
import sys

from fsmoe.cli import main

sys.exit(main())
