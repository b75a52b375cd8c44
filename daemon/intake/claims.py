"""What the intake needs to claim any file: safe job ids for odd names, and the record of claims that
fail (retried with back-off, reported to the operator).

A name that is not UTF-8 (os.listdir returns its bad bytes as lone surrogates, which SQLite cannot
store) or holds control characters still gets a job id, a spool folder and an outbox folder.

A claim fails for reasons outside dropq's control: EXDEV when the inbox and the spool are different
mounts (each `ReadWritePaths=` of a systemd unit is one), EACCES, EBUSY for a mount point. Such a name
is tried again after 1 s, doubling up to 60 s, logged once with its reason, and reported by
`ClaimRetries.trouble()`.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from dataclasses import dataclass, field

from dropq.escape import printable

__all__ = ["ClaimRetries", "ClaimTrouble", "printable", "safe_id"]

log = logging.getLogger("dropq.intake")

#: a job id (a spool and outbox folder name) is at most this many bytes of UTF-8, leaving room under
#: the 255-byte limit of a file name for a "-N" suffix and the outbox's ".<id>.tmp"
MAX_ID_BYTES = 200
#: a claim that failed is tried again after this many seconds, doubling up to CLAIM_RETRY_CAP
CLAIM_RETRY_FIRST = 1.0
CLAIM_RETRY_CAP = 60.0


def safe_id(stem: str) -> str:
    """The job id for a manifest's stem: the stem itself where it is printable UTF-8; else with each byte
    that is not UTF-8 and each control character (a newline, say) replaced by U+FFFD, and cut to
    MAX_ID_BYTES. Not unique by itself: the intake adds a suffix where the id is taken."""
    text = os.fsencode(stem).decode("utf-8", "replace")
    text = "".join("\ufffd" if unicodedata.category(c) == "Cc" else c for c in text)
    raw = text.encode()
    if len(raw) > MAX_ID_BYTES:
        text = raw[:MAX_ID_BYTES].decode("utf-8", "ignore")
    return text or "\ufffd"


@dataclass
class ClaimTrouble:
    """A manifest that could not be claimed: retried with back-off until it can, or is gone."""

    #: its name in the inbox, printable
    name: str
    #: why the last try failed, e.g. "[Errno 18] Invalid cross-device link: ..."
    reason: str
    attempts: int = 1
    #: when the first try failed (the intake's clock)
    since: float = 0.0
    #: when to try again
    next_try: float = field(default=0.0, repr=False)


class ClaimRetries:
    """The names (as listed in the inbox) whose claim failed, and when each may be tried again."""

    def __init__(self) -> None:
        self._failing: dict[str, ClaimTrouble] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._failing

    def may_try(self, name: str, now: float) -> bool:
        """False while `name`'s back-off runs: an event or a rescan does not cut it short."""
        trouble = self._failing.get(name)
        return trouble is None or trouble.next_try <= now

    def due(self, now: float) -> list[str]:
        return [name for name, t in self._failing.items() if t.next_try <= now]

    def next_times(self) -> list[float]:
        return [t.next_try for t in self._failing.values()]

    def failed(self, name: str, exc: Exception, now: float) -> None:
        reason = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        trouble = self._failing.get(name)
        if trouble is None:
            trouble = self._failing[name] = ClaimTrouble(name=printable(name), reason=reason, since=now)
            # once, with the reason; a traceback only for what is not a file-system error (a bug)
            log.warning("cannot claim %s: %s; retrying with back-off", trouble.name, reason,
                        exc_info=not isinstance(exc, OSError))
        else:
            trouble.attempts += 1
            trouble.reason = reason
            log.debug("cannot claim %s (attempt %d): %s", trouble.name, trouble.attempts, reason)
        trouble.next_try = now + min(CLAIM_RETRY_CAP, CLAIM_RETRY_FIRST * 2 ** (trouble.attempts - 1))

    def cleared(self, name: str) -> ClaimTrouble | None:
        """Forget `name` (claimed, or gone from the inbox); its record, if it had one."""
        return self._failing.pop(name, None)

    def failing(self) -> list[ClaimTrouble]:
        """The manifests that cannot be claimed at the moment, oldest trouble first."""
        return sorted(self._failing.values(), key=lambda t: (t.since, t.name))

    def trouble(self) -> str | None:
        """A short sentence while some manifest cannot be claimed, e.g. "cannot claim 3 manifest(s):
        [Errno 18] Invalid cross-device link: ..."; None when every claim succeeds."""
        failing = self.failing()
        if not failing:
            return None
        return f"cannot claim {len(failing)} manifest(s): {failing[0].reason}"
