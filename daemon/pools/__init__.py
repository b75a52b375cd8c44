"""Where workers come from. The balancer sees only `Pool` and `WorkerHandle`."""

from .base import Pool, WorkerHandle, find_staging, staging_dirs

__all__ = ["Pool", "WorkerHandle", "find_staging", "staging_dirs"]
