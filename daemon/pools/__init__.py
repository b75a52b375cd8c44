"""Where workers come from. The balancer sees only `Pool` and `WorkerHandle`."""

from .base import Incarnation, Pool, WorkerHandle, find_staging, staging_dirs

__all__ = ["Incarnation", "Pool", "WorkerHandle", "find_staging", "staging_dirs"]
