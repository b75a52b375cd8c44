"""Read-only access to the daemon's job database from the command line."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dropq.config import Config
from dropq.errors import NotYours, StoreError
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


def job_folder(config: Config, job: JobRecord) -> Path:
    """`job`'s outbox folder, once it is known to be readable here (or absent: the caller says so). On a
    shared host it belongs to whoever dropped the manifest, mode 0700: anyone else gets NotYours, naming both
    uids, rather than a bare "Permission denied"."""
    folder = config.outbox / job.folder
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return folder
    except PermissionError:
        raise NotYours(f"the outbox {config.outbox} cannot be entered as uid {os.geteuid()}, so job {job.id}'s "
                       "results cannot be read from here") from None
    if os.access(folder, os.R_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return folder
    raise NotYours(f"job {job.id}'s results ({folder}, mode {stat.S_IMODE(st.st_mode):04o}) belong to uid "
                   f"{st.st_uid}; you are uid {os.geteuid()}: on this shared host only a job's owner or root may "
                   "read them")


def check_may_cancel(config: Config, job: JobRecord) -> None:
    """NotYours when the daemon gives jobs to their owners (it runs as root) and `job` is not ours: the daemon
    would refuse the cancel file, so say it now rather than let the cancel vanish."""
    store = open_store(config)
    try:
        owned = store.meta().get("results_owned") == "1"
    finally:
        store.close()
    uid = os.geteuid()
    if owned and job.owner_uid is not None and uid not in (0, job.owner_uid):
        raise NotYours(f"job {job.id} was dropped by uid {job.owner_uid}; you are uid {uid}: on this shared host "
                       "only a job's owner or root may cancel it")
