"""Where workers come from: the local, docker and compose pools, the transport that reaches a worker,
and the Docker engine and worker image they need. The balancer sees only `Pool` and `WorkerHandle`."""

from dropq.pools.base import Incarnation, Pool, WorkerHandle, find_staging, staging_dirs

__all__ = ["Incarnation", "Pool", "WorkerHandle", "find_staging", "staging_dirs"]
