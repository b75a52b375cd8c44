"""Fail on purpose: writes a message to stderr and exits with code 3."""

import sys

print("about to fail", flush=True)
print("fail.py: something went wrong (on purpose)", file=sys.stderr)
sys.exit(3)
