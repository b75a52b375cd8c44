"""The daemon's environments: a job is placed in its program's environment when it is queued, and
environments are built one at a time by a thread of their own, off the job path.

A job whose environment is not ready is queued but held (jobs.held): the balancer skips it, and other
jobs keep running. The build that readies the environment releases every job held for it in the same
transaction. A failed build fails the jobs held for it, each with the installer's reason and the build's
log (env-build.log in its outbox folder); jobs of that environment then fail at once, without another
build, until environments.retry_failed_after has passed. A daemon that stops during a build kills it;
the next start builds that environment again from nothing, and its jobs are still queued.

Whoever builds an environment (the daemon, or `dropq env build` beside it) holds its lock file,
state/envs/.locks/<id>.lock, with flock: the kernel drops it when the builder dies, so a `building` state
whose lock is free is known to be stale, and one build per id runs at a time across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from dropq.config import Config
from dropq.envs.install import META, BuildInterrupted, ContainerInstaller, Installer, orphan_builds
from dropq.envs.spec import EnvSpec, Program, env_id, find_program
from dropq.errors import DropqError, EnvBuildError, ManifestError, StoreError
from dropq.intake.manifest import Manifest
from dropq.paths import remove_tree
from dropq.publish.committer import Committer
from dropq.queue.jobs import JobStatus
from dropq.queue.store import EnvRecord, EnvState, JobRecord, Store
from dropq_worker.trees import walk

log = logging.getLogger("dropq.envs")

#: the build log a failed job's outbox folder gets
BUILD_LOG = "env-build.log"
#: seconds between two looks for environments unused for environments.keep_days
PRUNE_EVERY = 3600.0


class Environments:
    def __init__(self, *, config: Config, store: Store, committer: Committer | None, installer: Installer | None,
                 notify: Callable[[], None], now: Callable[[], float] = time.time, fail_jobs: bool = True) -> None:
        self.config = config
        self.store = store
        #: publishes the jobs a failed build fails (None in `dropq env`, which fails none)
        self.committer = committer
        #: None: this pool cannot run jobs in environments (compose-managed workers)
        self.installer = installer
        self._notify = notify
        self._now = now
        self.root = config.envs_dir
        self._requests: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._requested: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: False in `dropq env build`: the daemon fails the jobs of a failed build, and publishes them
        self._fail_jobs = fail_jobs
        #: what is being built now, for status screens
        self.building: str | None = None
        #: builds done by this process, for `dropq status` and the tests that count them
        self.builds = 0

    # --- the daemon's side ----------------------------------------------------------------------

    def start(self) -> None:
        self.prepare()
        self._recover()
        self._thread = threading.Thread(target=self._loop, name="envs", daemon=True)
        self._thread.start()

    def prepare(self) -> None:
        for folder in (self.root, self.root / ".logs", self.root / ".cache", self.root / ".locks"):
            folder.mkdir(parents=True, exist_ok=True)
        # job uids (another uid than the daemon's) must reach the environments to run in them; the logs
        # and locks are the daemon's own
        os.chmod(self.root, 0o755)
        os.chmod(self.root / ".logs", 0o700)
        os.chmod(self.root / ".locks", 0o700)

    def stop(self) -> None:
        """Stop building: a build under way is killed (the next start builds it again)."""
        self._stop.set()
        self._requests.put(None)

    def join(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _recover(self) -> None:
        """At start: a build the last daemon left half-done starts again; held jobs get their builds."""
        if self._fail_jobs:  # the daemon (one per state directory): what its predecessor left building is stopped
            stopped = orphan_builds(self.root, containers=isinstance(self.installer, ContainerInstaller))
            if stopped:
                log.info("stopped %d build process(es) or container(s) a previous daemon left running", stopped)
        for record in self.store.envs():
            if record.state is EnvState.BUILDING and not self._locked_elsewhere(record.id):
                log.info("environment %s: its build was interrupted; building it again", record.short)
                self.store.env_state(record.id, EnvState.PENDING, only_from=[EnvState.BUILDING])
        for env in self.store.held_envs():
            record = self.store.env(env)
            if record is None or record.state is EnvState.FAILED:
                self._fail_held(env)
            elif record.state is EnvState.READY:  # cannot happen (ready releases at once), but never strand a job
                self.store.env_ready(env, packages=record.packages or [], size_bytes=record.size_bytes or 0)
            else:
                self._request(env)

    # --- placing a job ---------------------------------------------------------------------------

    def place(self, job_id: str) -> None:
        """Queue a job whose inputs are all there, in its program's environment (built if need be)."""
        job = self.store.get(job_id)
        try:
            if job.manifest is None:
                raise ManifestError("it has no manifest")  # cannot be: the intake stored it before
            found = find_program(self.config.programs, Manifest.from_json(job.manifest).program)
        except DropqError as exc:
            self.fail(self.store.get(job_id), f"its program changed since it was claimed: {exc}")
            return
        if found.spec is None:
            self.store.queue_job(job_id)
            self._notify()
            return
        if self.installer is None:
            self.fail(self.store.get(job_id), f"{found.spec.declared_in} lists dependencies, and environments need "
                      "the local or the docker pool: compose-managed workers do not mount them")
            return
        try:
            record = self.want(found)
        except EnvBuildError as exc:
            self.fail(self.store.get(job_id), f"its environment could not be prepared: {exc}")
            return
        if record.state is EnvState.FAILED:
            assert record.failed_at is not None
            if self._now() - record.failed_at < self.config.environments.retry_failed_after:
                self.fail(self.store.get(job_id), self._failure(record), env=record)
                return
            self.store.env_state(record.id, EnvState.PENDING, only_from=[EnvState.FAILED])
        job = self.store.queue_job(job_id, env=record.id)
        if job.held is not None:
            self.want(found)  # made again, should it have been pruned since it was found ready
            log.info("job %s: queued; waits for environment %s (%s)", job_id, record.short, record.summary)
            self._request(record.id)
        else:
            self._notify()

    def want(self, program: Program) -> EnvRecord:
        """The environment record of a program that declares dependencies (made when new)."""
        assert program.spec is not None and self.installer is not None
        target = self.installer.target()
        env = env_id(program.spec, target, self.index_key())
        return self.store.want_env(env, spec=program.spec.to_json(), target=target)

    def index_key(self) -> dict[str, Any]:
        assert self.installer is not None
        return self.installer.index.key()

    def _failure(self, record: EnvRecord) -> str:
        return f"its environment {record.short} ({record.summary}) could not be built: {record.error}"

    def fail(self, job: JobRecord, error: str, *, env: EnvRecord | None = None) -> None:
        """End a job that never ran as failed, with the build's log in its folder when there is one."""
        if env is not None:
            built_log = self.log_path(env.id)
            if built_log.is_file():
                spool = self.config.spool / job.spool_id  # a task's log goes into its array's folder
                spool.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(built_log, spool / BUILD_LOG)
        log.warning("job %s: failed: %s", job.id, error)
        outcome: dict[str, Any] = {"status": JobStatus.FAILED.value, "error": error, "exit_code": None,
                                   "finished_at": self._now()}
        if env is not None:
            outcome["environment"] = {"id": env.id}
        assert self.committer is not None, "only the daemon fails jobs"
        try:
            self.committer.finish(job.id, outcome)
        except StoreError:
            log.exception("job %s: could not be failed", job.id)

    def log_path(self, env: str) -> Path:
        return self.root / ".logs" / f"{env}.log"

    # --- building ----------------------------------------------------------------------------------

    def want_program(self, program: str) -> EnvRecord | None:
        """The environment of a program (`dropq env build`), made pending when new or failed; None when the
        program declares no dependencies."""
        found = find_program(self.config.programs, program)
        if found.spec is None:
            return None
        if self.installer is None:
            raise EnvBuildError("environments need the local or the docker pool")
        record = self.want(found)
        if record.state is EnvState.FAILED:
            self.store.env_state(record.id, EnvState.PENDING, only_from=[EnvState.FAILED])
        return record

    def _request(self, env: str) -> None:
        with self._lock:
            if env in self._requested:
                return
            self._requested.add(env)
        self._requests.put(env)

    def _loop(self) -> None:
        next_prune = self._now() + 60.0
        while not self._stop.is_set():
            try:
                env = self._requests.get(timeout=max(1.0, next_prune - self._now()))
            except queue.Empty:
                next_prune = self._now() + PRUNE_EVERY
                self._prune_quietly()
                continue
            if env is None:
                return
            try:
                self.build(env)
            except Exception:  # the thread must go on building the next; the environment is failed below
                log.exception("environment %s: the build went wrong", env[:8])
                self._failed(env, "dropq could not build it (an internal error; see the daemon's log)")
            finally:
                with self._lock:
                    self._requested.discard(env)

    def build(self, env: str) -> EnvRecord | None:
        """Build environment `env` unless it is ready or failed; returns its record after. Waits while another
        process builds it (its lock), then takes what that build made."""
        with self._lock_of(env) as locked:
            if not locked:  # stopping while another process builds it: its next start sees to it
                return self.store.env(env)
            record = self.store.env(env)
            if record is None:
                return None
            if record.state is EnvState.READY:  # another process built it meanwhile
                self._notify()
                return record
            if record.state is EnvState.FAILED:
                self._fail_held(env)
                return record
            # pending, or building by a process that died (its lock was free)
            self.store.env_state(env, EnvState.BUILDING, only_from=[EnvState.PENDING, EnvState.BUILDING])
            self._build(record)
            return self.store.env(env)

    def _build(self, record: EnvRecord) -> None:
        assert self.installer is not None
        env = record.id
        spec = EnvSpec.from_json(record.spec)
        folder = self.root / env
        remove_tree(folder)
        self.building = env
        started = time.monotonic()
        log.info("environment %s: building (%s) for %s", record.short, record.summary, _target_text(record.target))
        try:
            _check_python(spec, record.target)
            with open(self.log_path(env), "wb") as build_log:
                self.installer.build(env, spec, folder, build_log, timeout=self.config.environments.build_timeout,
                                     cancel=self._stop)
            packages = _packages(folder / META / "packages.txt")
            size = _open_to_all(folder)
        except BuildInterrupted:
            log.info("environment %s: build stopped; the next start builds it again", record.short)
            self.store.env_state(env, EnvState.PENDING, only_from=[EnvState.BUILDING])
            remove_tree(folder)
            return
        except EnvBuildError as exc:
            self._failed(env, str(exc))
            return
        finally:
            self.building = None
            self.builds += 1
        released = self.store.env_ready(env, packages=packages, size_bytes=size)
        log.info("environment %s: ready in %.1f s, %d package(s), %.1f MB; %d job(s) released", record.short,
                 time.monotonic() - started, len(packages), size / 1e6, released)
        self._notify()

    @contextlib.contextmanager
    def _lock_of(self, env: str) -> Iterator[bool]:
        """Hold environment `env`'s build lock (waiting for another process's build to end); False when
        this process stops before it got it."""
        fd = os.open(self.root / ".locks" / f"{env}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self._stop.wait(0.5):
                        yield False
                        return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def _locked_elsewhere(self, env: str) -> bool:
        path = self.root / ".locks" / f"{env}.lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _failed(self, env: str, error: str) -> None:
        self.store.env_failed(env, error)
        remove_tree(self.root / env)
        log.warning("environment %s: build failed: %s", env[:8], error)
        self._fail_held(env)

    def _fail_held(self, env: str, error: str | None = None) -> None:
        """Fail the jobs held for a failed environment (in the daemon only: it publishes jobs)."""
        if not self._fail_jobs:
            return
        record = self.store.env(env)
        for job in self.store.held_for(env):
            if record is not None:
                self.fail(job, self._failure(record), env=record)
            else:
                self.fail(job, f"its environment could not be built: {error or 'its record was lost'}")

    # --- pruning ---------------------------------------------------------------------------------------

    def prune(self, *, unused_for: float) -> list[EnvRecord]:
        """Remove the environments no job has used for `unused_for` seconds, that no job still needs and
        no build holds; returns those removed."""
        removed = []
        cutoff = self._now() - unused_for
        for record in self.store.envs():
            if record.state in (EnvState.PENDING, EnvState.BUILDING):
                continue
            used = record.last_used or record.built_at or record.created_at
            if used > cutoff or self._locked_elsewhere(record.id):
                continue
            if self.store.forget_env(record.id):  # refuses, in its transaction, one a job still needs
                remove_tree(self.root / record.id)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.log_path(record.id))
                removed.append(record)
                log.info("environment %s (%s): removed, unused for %.1f days", record.short, record.summary,
                         (self._now() - used) / 86400)
        return removed

    def _prune_quietly(self) -> None:
        try:
            self.prune(unused_for=self.config.environments.keep_days * 86400)
        except (OSError, StoreError):
            log.exception("pruning unused environments failed; trying again in an hour")

def _check_python(spec: EnvSpec, target: dict[str, str]) -> None:
    if spec.requires_python is None:
        return
    try:
        version = Version(target.get("python", ""))
    except InvalidVersion:
        return
    if version not in SpecifierSet(spec.requires_python):
        raise EnvBuildError(f"{spec.declared_in} requires Python {spec.requires_python}, and this pool's "
                            f"interpreter is Python {version}")


def _packages(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return sorted(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def _open_to_all(folder: Path) -> int:
    """Make the environment readable by every uid (jobs run under uids of their own) and writable by the
    daemon only: a daemon running as root takes the files of a build that ran as an unprivileged uid, so
    that uid cannot change them afterwards. Returns its size in bytes."""
    size = 0
    uid, gid = os.geteuid(), os.getegid()
    for path, st, _depth in [*walk(folder), (folder, os.lstat(folder), 0)]:
        size += st.st_size
        if uid == 0 and (st.st_uid, st.st_gid) != (uid, gid):
            os.lchown(path, uid, gid)
        if stat.S_ISLNK(st.st_mode):
            continue
        executable = stat.S_ISDIR(st.st_mode) or st.st_mode & 0o100
        wanted = stat.S_IMODE((st.st_mode | 0o444 | (0o111 if executable else 0)) & ~0o022)
        if wanted != stat.S_IMODE(st.st_mode):
            os.chmod(path, wanted)
    return size


def _target_text(target: dict[str, str]) -> str:
    if target.get("pool") == "docker":
        return f"Python {target.get('python')} in image {target.get('image', '')[:19]}"
    return f"Python {target.get('python')} ({target.get('executable')})"
