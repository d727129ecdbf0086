"""Make the repository root importable as the package `armor`.

The model files sit flat at the top of the repository, as they do in a Hub checkpoint, and import each other
relatively (`from .configuration_armor import ...`), which is what transformers' remote-code loader requires.
Registering the root as a namespace package lets the tests import them the same way.
"""

import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

if "armor" not in sys.modules:
    package = types.ModuleType("armor")
    package.__path__ = [str(REPO_ROOT)]
    sys.modules["armor"] = package
