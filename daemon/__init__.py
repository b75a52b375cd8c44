"""dropq: a drop-folder batch processor (the host side: daemon, CLI, pools)."""

__version__ = "0.2.0"
