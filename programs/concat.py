"""Print the input files one after the other, each line after --prefix: joins (and marks) the outputs of
earlier jobs in a pipeline (see the README's "Pipelines").

usage: concat.py FILE... [--prefix TEXT]
"""

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+")
    parser.add_argument("--prefix", default="", help="put TEXT before every line")
    args = parser.parse_args()
    for name in args.files:
        with open(name, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                sys.stdout.write(args.prefix + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
