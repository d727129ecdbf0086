"""Import the repository's flat model files as the package `armor`, as the scripts do (see `armor_package.py`)."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

sys.path.insert(0, str(REPO_ROOT))
import armor_package  # noqa: E402,F401  (registers the package `armor`)
