"""Named exit codes: each kind of failure has its own, listed in `dropq --help`."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    #: the job waited for did not succeed
    JOB_FAILED = 1
    USAGE = 2
    #: the configuration is wrong, or the state directory was written by a newer dropq: restarting cannot
    #: cure either, so the systemd unit does not restart on this code
    CONFIG = 3
    NOT_FOUND = 4
    #: --wait gave up before the job finished
    TIMEOUT = 5
    #: the daemon could not start (another one runs, workers would not start), or --wait found none running
    DAEMON = 6
    #: the system refused: a permission, a full disk, a missing folder
    SYSTEM = 7
    #: cancel: the job had already finished, so nothing was cancelled
    ALREADY_FINISHED = 8
