"""Where the tests' own files are, whatever folder depth a test module sits at."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"
ROOT = TESTS.parent
