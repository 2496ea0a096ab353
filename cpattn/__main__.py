"""Command line: `python -m cpattn info`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpattn", description="cpattn attention runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="every provider on this machine: available or not, and why")
    sub.add_parser("matrix", help="the support matrix (markdown) from the providers' declared capabilities")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import print_info

        print_info()
    elif args.command == "matrix":
        from .info import support_matrix_markdown

        print(support_matrix_markdown(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
