"""Count words in the input file: prints `<count> <word>` lines, most frequent first.

usage: wordcount.py INPUT [--top N]
"""

import argparse
import collections
import re
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("--top", type=int, default=0, help="print only the N most frequent words")
    args = parser.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    with open(args.input, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            counts.update(w.lower() for w in re.findall(r"[A-Za-z']+", line))
    total = sum(counts.values())
    for word, n in counts.most_common(args.top or None):
        print(f"{n} {word}")
    print(f"{total} words", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
