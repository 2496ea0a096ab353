#!/usr/bin/env bash
# The README's test command: install (CPU torch pinned), check the import layers, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e ".[dev]"
lint-imports
python3 -m pytest -q -p no:cacheprovider "$@"
