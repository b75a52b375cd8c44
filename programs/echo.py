"""Print the arguments and selected environment variables: handy for checking a manifest.

usage: echo.py [ARG...]
"""

import os
import sys

print(" ".join(sys.argv[1:]))
for name in sorted(os.environ):
    if name.startswith("DROPQ_") or name in ("LANG", "GREETING"):
        print(f"{name}={os.environ[name]}")
