"""Print a numbered line every INTERVAL seconds, COUNT times: a job whose output grows as it runs
(try `dropq logs ID --follow` on it).

usage: ticker.py [COUNT] [INTERVAL]
"""

import sys
import time

count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
interval = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
for n in range(1, count + 1):
    print(f"tick {n} of {count}", flush=True)
    if n < count:
        time.sleep(interval)
print("ticker: done", file=sys.stderr)
