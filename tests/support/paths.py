"""Where things are, for tests and the scripts they start (which may run with any working directory)."""

import os

SUPPORT = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(SUPPORT)
REPO = os.path.dirname(TESTS)
STANDINS = os.path.join(SUPPORT, "standins")
LAUNCH = os.path.join(REPO, "launch")
