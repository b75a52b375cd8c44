"""Where workers come from. The balancer sees only `Pool` and `WorkerHandle`."""

from .base import Pool, WorkerHandle

__all__ = ["Pool", "WorkerHandle"]
