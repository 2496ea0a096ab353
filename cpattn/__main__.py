"""Command line: `python -m cpattn info`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpattn", description="cpattn attention runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="every provider on this machine: available or not, and why")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import print_info

        print_info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
