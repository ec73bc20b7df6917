import os
import sys

# `hf_reference` is a helper module next to the tests.
sys.path.insert(0, os.path.dirname(__file__))
