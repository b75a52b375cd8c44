"""The dropq worker: a small Flask app that runs one job at a time, in a container or as a local process.

It knows nothing of SQLite, the inbox or other workers: it receives a job description over its API,
runs the named program on files below its own mounts, and reports how the program ended.
"""

__version__ = "0.1.0"
