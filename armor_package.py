"""Make the repository's flat model files importable as the package `armor`.

The model files sit at the top of the repository, as they do in a Hub checkpoint, and import each other relatively
(`from .configuration_armor import ...`), which is what transformers' remote-code loader requires. Importing this
module registers the repository root as the package `armor`, so scripts and tests can write
`from armor.modeling_armor import ...`.
"""

import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
# The modules a checkpoint folder carries beside its weights, for `trust_remote_code`.
CODE_FILES = ("configuration_armor.py", "modeling_armor.py", "modeling_vqgan.py", "processing_armor.py")

if "armor" not in sys.modules:
    _package = types.ModuleType("armor")
    _package.__path__ = [str(REPO_ROOT)]
    sys.modules["armor"] = _package
