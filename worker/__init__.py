"""The dropq worker: a small Flask app that runs one job at a time, in a container or as a local process.

It knows nothing of SQLite, the inbox or other workers: it receives a job description over its API,
runs the named program on files below its own mounts, and reports how the program ended. What the
daemon and the worker agree on (the version, the messages, the staging layout) is in `protocol`.
"""

__version__ = "0.2.0"
