import os
import sys

# Tests import helpers (hf_models.py, ...) that live next to them.
sys.path.insert(0, os.path.dirname(__file__))
