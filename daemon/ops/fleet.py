"""Workers grouped by the agent (and host) they run on, with each agent's last contact: one view for
`dropq workers`, `dropq status`, the dashboard and /metrics (README: More than one host)."""

from __future__ import annotations

import time
from typing import Any

from dropq.queue.store import Store

#: the last contact is written at most once a second: an agent counts as lost a second after its lease
SLACK = 1.0


def agents(store: Store, *, now: float | None = None, running: bool = True) -> list[dict[str, Any]]:
    """The agents ever registered, each with `state`: connected, lost (no contact within a lease) or, when the
    daemon is not running, stopped; and `last_contact_seconds`, how long ago it was heard from."""
    now = time.time() if now is None else now
    lease = _float(store.meta().get("agents_lease"))
    found = []
    for row in store.agents():
        ago = max(0.0, now - row["last_contact"])
        state = "stopped" if not running else ("connected" if lease is not None and ago <= lease + SLACK else "lost")
        found.append({**row, "state": state, "last_contact_seconds": round(ago, 1)})
    return found


def workers(store: Store, *, now: float | None = None, running: bool = True) -> list[dict[str, Any]]:
    """The store's workers, each with `agent`, `host` and `agent_state` (None for this host's own workers),
    this host's first, then each agent's."""
    known = agents(store, now=now, running=running)
    owner = {f"{a['name']}-w{i + 1}": a for a in known for i in range(a["workers"])}
    listed = []
    for w in store.workers():
        agent = owner.get(w["name"])
        listed.append({**w, "agent": agent["name"] if agent else None, "host": agent["host"] if agent else None,
                       "agent_state": agent["state"] if agent else None,
                       "last_contact_seconds": agent["last_contact_seconds"] if agent else None})
    return sorted(listed, key=lambda w: (w["agent"] is not None, w["agent"] or "", _number_of(w["name"])))


def _number_of(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("w")
    return (head, int(tail)) if tail.isdigit() else (name, 0)


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None
