import os
import sys

# Tests import the PyTorch peers helper module that sits beside them.
sys.path.insert(0, os.path.dirname(__file__))
