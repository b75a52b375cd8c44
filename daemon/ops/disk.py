"""Free space: the daemon stops claiming new manifests while the outbox's or the state's filesystem has
less than disk.min_free free, and claims again by itself once it has. What is claimed before is not
affected; manifests wait in the inbox, where they are as safe as anywhere."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from dropq.units import human_size

log = logging.getLogger("dropq.disk")


class DiskGuard:
    def __init__(self, paths: list[Path], *, min_free: int, check_every: float = 2.0,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.paths = paths
        self.min_free = min_free
        self.check_every = check_every
        self._now = now
        self._next = 0.0
        self._said: str | None = None

    def low(self) -> str | None:
        """Why claiming must wait (a sentence naming the folder and the figures), or None; looked at no more
        often than every `check_every` seconds."""
        now = self._now()
        if now < self._next:
            return self._said
        self._next = now + self.check_every
        said = None
        for path in self.paths:
            try:
                st = os.statvfs(path)
            except OSError:
                continue  # not made yet: nothing is written there either
            free = st.f_bavail * st.f_frsize
            if free < self.min_free:
                said = (f"{human_size(free)} free under {path}, less than disk.min_free ({human_size(self.min_free)}): "
                        "new manifests wait in the inbox")
                break
        if said != self._said:
            if said is not None:
                log.warning("claiming paused: %s", said)
            else:
                log.info("claiming resumed: free space is back above disk.min_free")
            self._said = said
        return said
