import os
import sys

# Shared test code (helpers, the CP harness, named stand-ins, subprocess workers) lives in tests/support.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))
