import sys

from dropq.cli import main

sys.exit(main())
