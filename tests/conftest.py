import sys
from pathlib import Path

# The unit tests import their model builders (tiny_models.py) as a top-level module.
sys.path.insert(0, str(Path(__file__).parent / "unit"))
