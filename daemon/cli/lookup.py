"""Read-only access to the daemon's job database from the command line."""

from __future__ import annotations

import os

from dropq.config import Config
from dropq.errors import StoreError
from dropq.queue.store import JobRecord, Store


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


def daemon_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemon_running(config: Config) -> bool:
    """Whether a daemon runs on `config`'s state folder: the pid it recorded at its start is alive."""
    try:
        store = open_store(config)
    except StoreError:  # no job database: no daemon has ever run here
        return False
    try:
        return daemon_alive(store.meta().get("pid", ""))
    finally:
        store.close()
