"""Sleep for N seconds (default 1), then say so.

usage: sleep.py [SECONDS]
"""

import sys
import time

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
time.sleep(seconds)
print(f"slept {seconds:g} seconds")
