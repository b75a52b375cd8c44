"""The dropq worker: a small Flask app that runs one job at a time, in a container or as a local process.

It knows nothing of SQLite, the inbox or other workers: it receives a job description over its API,
runs the named program on files below its own mounts, and reports how the program ended.
"""

__version__ = "0.2.0"

#: what the daemon and the worker agree on: the API and the staging folder's layout. Raised on any
#: incompatible change, so that a daemon never uses a worker (an old image, say) that lays files out
#: where it does not look. 2: one request per job (POST /jobs?wait=), flat staging (`<id>/`, `<id>.stdout`).
PROTOCOL = 2
