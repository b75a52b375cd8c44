"""Prometheus metrics for /metrics.

Counts and gauges are read from the store at each scrape, so they agree with `dropq status` and survive
a restart of the daemon. The two histograms (wait and run time) are observed as each job is published:
they start from zero with each daemon run, which Prometheus's rate() and histogram_quantile() expect of
any process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from dropq.ops import fleet
from dropq.queue.jobs import FINAL, JobStatus
from dropq.queue.store import JobRecord, Store
from dropq_worker.protocol import WorkerState

#: seconds; from a few milliseconds (trivial jobs on a warm pool) to an hour (a long backlog or a long job)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
ACTIVE = (JobStatus.WAITING, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.COMMITTING)


class Metrics:
    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.wait = Histogram("dropq_job_wait_seconds", "Time from a manifest's claim to its job's start on a "
                              "worker (the last attempt's start)", buckets=BUCKETS, registry=self.registry)
        self.run = Histogram("dropq_job_run_seconds", "Time the program ran, as its worker measured it",
                             buckets=BUCKETS, registry=self.registry)
        self.registry.register(StoreCollector(store))

    def observe(self, job: JobRecord) -> None:
        """Called once per published job."""
        if job.started_at is not None:
            self.wait.observe(max(0.0, job.started_at - job.submitted_at))
        if job.run_seconds is not None:
            self.run.observe(job.run_seconds)


class StoreCollector(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        counts = self.store.counts()
        meta = self.store.meta()
        workers = self.store.workers()
        finished = CounterMetricFamily("dropq_jobs", "Jobs finished, by final status", labels=["status"])
        for status in sorted(FINAL, key=lambda s: s.value):
            finished.add_metric([status.value], counts.get(status.value, 0))
        yield finished
        active = GaugeMetricFamily("dropq_jobs_active", "Jobs not yet finished, by status", labels=["status"])
        for status in ACTIVE:
            active.add_metric([status.value], counts.get(status.value, 0))
        yield active
        yield GaugeMetricFamily("dropq_queue_depth", "Jobs queued and waiting for a worker",
                                value=counts.get(JobStatus.QUEUED.value, 0))
        by_state = GaugeMetricFamily("dropq_workers", "Workers, by state", labels=["state"])
        states: dict[str, int] = {WorkerState.IDLE.value: 0, WorkerState.BUSY.value: 0}
        for w in workers:
            states[w["state"]] = states.get(w["state"], 0) + 1
        for state, n in sorted(states.items()):
            by_state.add_metric([state], n)
        yield by_state
        known = fleet.agents(self.store)
        if known:
            up = GaugeMetricFamily("dropq_agent_up", "1 while the agent renews in time, 0 once it is lost",
                                   labels=["agent", "host"])
            contact = GaugeMetricFamily("dropq_agent_last_contact_seconds", "Seconds since the agent was last heard "
                                        "from", labels=["agent", "host"])
            count = GaugeMetricFamily("dropq_agent_workers", "Workers the agent registered", labels=["agent", "host"])
            for agent in known:
                labels = [agent["name"], agent["host"]]
                up.add_metric(labels, 1 if agent["state"] == "connected" else 0)
                contact.add_metric(labels, agent["last_contact_seconds"])
                count.add_metric(labels, agent["workers"])
            yield from (up, contact, count)
        yield CounterMetricFamily("dropq_watcher_rescans", "Full rescans of the inbox",
                                  value=_number(meta.get("watcher_rescans")))
        yield CounterMetricFamily("dropq_watcher_missed", "Manifests the watcher's events missed (an inotify "
                                  "queue overflow, most often) that a rescan found",
                                  value=_number(meta.get("watcher_missed")))
        yield GaugeMetricFamily("dropq_claiming_paused_disk", "1 while new manifests wait in the inbox because "
                                "free space is below disk.min_free", value=1 if meta.get("disk_low") else 0)
        yield InfoMetricFamily("dropq", "The daemon's pool and watcher",
                               value={"pool": meta.get("pool", ""), "watcher": meta.get("watcher", "")})


def _number(text: str | None) -> float:
    try:
        return float(text or 0)
    except ValueError:
        return 0.0
