"""Each user's results kept to them, on a shared host where the daemon runs as root.

The owner of a job is the owner (uid, gid) of its manifest file as the claim found it: lstat of the file
renamed into the spool, never a name or a manifest's key, so nobody can claim to be somebody else. It is
recorded in the store, so a restart keeps it.

When the daemon runs as root, the published folder and every file in it are given to that owner (before
the publishing rename, so nobody ever sees the folder as anyone else's), the folder with `results.mode`
(0700 by default): other users cannot read the job's results. A cancel file is obeyed only from the job's
owner or root; a job takes as inputs only its owner's files from the inbox, and reads another job's outbox
folder (`outbox:` inputs) only when both have the same owner (a manifest dropped by root may take either).
The job itself still runs under its sandbox uid.

A daemon that does not run as root cannot give files away: then nothing here changes anything.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from dropq.config import Config
from dropq.escape import printable
from dropq.queue.store import JobRecord
from dropq_worker.trees import walk

log = logging.getLogger("dropq.owners")

ROOT_UID = 0


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int

    @classmethod
    def of(cls, path: Path) -> Owner:
        """The owner of `path` itself (lstat: a link's own owner, never its target's)."""
        st = os.lstat(path)
        return cls(st.st_uid, st.st_gid)

    @classmethod
    def of_job(cls, job: JobRecord | None) -> Owner | None:
        """Who dropped `job`'s manifest; None when that is not known (claimed before dropq recorded it)."""
        if job is None or job.owner_uid is None or job.owner_gid is None:
            return None
        return cls(job.owner_uid, job.owner_gid)

    def pair(self) -> tuple[int, int]:
        return self.uid, self.gid


@dataclass(frozen=True, kw_only=True)
class Ownership:
    #: whether jobs' folders are given to their owners: only a daemon running as root can
    active: bool
    #: the mode of a job's outbox folder when given to its owner (results.mode)
    mode: int = 0o700

    @classmethod
    def from_config(cls, config: Config, *, euid: int | None = None) -> Ownership:
        """As `config` says, for a daemon running as `euid` (by default, this process's)."""
        return cls(active=(os.geteuid() if euid is None else euid) == ROOT_UID, mode=config.results.mode_bits)

    def give(self, folder: Path, owner: Owner | None) -> list[str]:
        """Give `folder` (a job's folder about to be published, which no job and no user can reach) and
        everything in it to `owner`, the folder with mode `self.mode`; returns the paths, relative to
        `folder`, that were not given away.

        Nothing follows a link: lchown changes a link itself, and the tree has none left (collect_tree
        removed them). A file with more than one hard link is left as it is: the other link may be a file
        outside the job (an input linked to someone's file), which must never change hands."""
        if not self.active or owner is None:
            return []
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise NotADirectoryError(f"{folder} is not a folder")
        try:
            kept = self._chown_tree(folder, owner)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            # a filesystem where root may not give files away (NFS with root_squash, some FUSE mounts): the
            # folder stays the daemon's, still with the mode, so that no other user can read it; a commit
            # that failed here instead would be retried for ever and publish nothing
            os.chmod(folder, self.mode)
            log.error("%s: could not be given to uid %d (%s); it stays the daemon's, mode %04o, unreadable by other "
                      "users", folder.name, owner.uid, exc.strerror or exc, self.mode)
            return ["."]
        os.chmod(folder, self.mode)
        if kept:
            log.warning("%s: %d file(s) with several hard links kept their owner: %s", folder.name, len(kept),
                        ", ".join(kept[:5]))
        return kept

    @staticmethod
    def _chown_tree(folder: Path, owner: Owner) -> list[str]:
        """lchown `folder` and what is in it to `owner`, but files with several links; returns those."""
        kept: list[str] = []
        for path, st, _depth in walk(folder):
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                kept.append(printable(str(path.relative_to(folder))))
                continue
            os.lchown(path, owner.uid, owner.gid)
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                # Linux clears these on chown already; said here so that no kernel's choice decides it
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
        os.lchown(folder, owner.uid, owner.gid)
        return kept

    def cancel_refused(self, requester_uid: int, owner: Owner | None) -> str | None:
        """Why a cancel file owned by `requester_uid` must not cancel a job of `owner`; None if it may."""
        if not self.active or owner is None or requester_uid in (ROOT_UID, owner.uid):
            return None
        return (f"the cancel file belongs to uid {requester_uid}, but the job was dropped by uid {owner.uid}: "
                "only a job's owner or root may cancel it")

    def input_refused(self, file_uid: int, owner: Owner | None) -> str | None:
        """Why a job of `owner` must not take an inbox file owned by `file_uid` as its input: on a shared
        inbox, naming another user's file would hand it to this job, and then its folder to this owner."""
        if not self.active or owner is None or owner.uid in (ROOT_UID, file_uid):
            return None
        return (f"the file belongs to uid {file_uid}, but the manifest was dropped by uid {owner.uid}: a job takes "
                "only its own owner's files from the inbox")

    def read_refused(self, reader: Owner | None, upstream: Owner | None, *, upstream_id: str) -> str | None:
        """Why a job of `reader` must not read job `upstream_id`'s outbox folder (`upstream` its owner)."""
        if not self.active or upstream is None or (reader is not None and reader.uid in (ROOT_UID, upstream.uid)):
            return None
        who = "someone unknown" if reader is None else f"uid {reader.uid}"
        return (f"job {upstream_id}'s results belong to uid {upstream.uid}, and this manifest was dropped by {who}: "
                "a job may read only its own owner's outbox folders")
