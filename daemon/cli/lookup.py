"""Read-only access to the daemon's job database from the command line."""

from __future__ import annotations

from ..config import Config
from ..errors import StoreError
from ..store import JobRecord, Store


def last_seq(config: Config) -> int:
    try:
        store = Store(config.database, readonly=True)
    except StoreError:
        return 0
    try:
        return store.last_seq()
    finally:
        store.close()


def open_store(config: Config) -> Store:
    return Store(config.database, readonly=True)


def get_job(config: Config, job_id: str) -> JobRecord:
    store = open_store(config)
    try:
        return store.get(job_id)
    finally:
        store.close()
