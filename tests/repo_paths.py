"""Where the tests find the repository and the committed fixtures, whatever folder of tests/ they are in."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FIXTURES = TESTS / "fixtures"
