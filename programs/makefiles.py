"""Write files into the working directory (which dropq publishes as the job's output/ folder).

usage: makefiles.py [COUNT]   writes part-1.txt .. part-COUNT.txt and summary/index.txt
"""

import os
import sys

count = int(sys.argv[1]) if len(sys.argv) > 1 else 3
os.makedirs("summary", exist_ok=True)
for i in range(1, count + 1):
    with open(f"part-{i}.txt", "w") as fh:
        fh.write(f"this is part {i} of {count}\n")
with open(os.path.join("summary", "index.txt"), "w") as fh:
    fh.write("\n".join(f"part-{i}.txt" for i in range(1, count + 1)) + "\n")
print(f"wrote {count} files into {os.environ.get('DROPQ_OUTPUT', os.getcwd())}")
