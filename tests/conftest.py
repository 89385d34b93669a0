"""Subprocesses started by the tests (``python -m fsmoe.cli`` in a temp dir, torchrun workers)
import the fsmoe of this checkout, even where another checkout is installed in the environment."""
import os
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
