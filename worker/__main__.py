"""Serve the worker app with waitress, on a Unix socket (local and docker pools) or TCP with a token.

    python -m dropq_worker --socket /dropq/work/worker.sock --programs /dropq/programs \
        --inputs /dropq/inputs --jobs /dropq/work/jobs
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

from . import isolation, procs, warm
from .app import create_app
from .job import Settings
from .launcher import Launcher
from .runner import Runner
from .supervise import reap_abandoned

log = logging.getLogger("dropq.worker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dropq-worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", type=Path, help="serve on this Unix socket (mode 0600)")
    where.add_argument("--listen", metavar="HOST:PORT", help="serve on TCP; requires a token")
    p.add_argument("--programs", type=Path, required=True)
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--jobs", type=Path, required=True, help="staging folder, one subfolder per job")
    # {host} in --socket, --inputs and --jobs stands for the hostname (used by docker-compose.yml)
    p.add_argument("--python", default="python3", help="interpreter for .py programs")
    p.add_argument("--envs", type=Path, help="programs' environments, one folder per id (read-only)")
    p.add_argument("--name", help="the worker's name in /health")
    p.add_argument("--token-env", default="DROPQ_WORKER_TOKEN",
                   help="environment variable holding the bearer token (removed once read)")
    p.add_argument("--threads", type=int, default=6)
    p.add_argument("--max-file-bytes", type=int, default=1 << 30,
                   help="largest file a job may write (RLIMIT_FSIZE; default 1 GiB); 0: no limit")
    p.add_argument("--job-uids", metavar="BASE:COUNT",
                   help="run each job under the next uid of BASE..BASE+COUNT-1 (the worker must start as root); "
                        "see dropq_worker.isolation")
    p.add_argument("--owner", metavar="UID:GID",
                   help="with --job-uids: who gets a job's files and the socket (the daemon's uid)")
    p.add_argument("--max-disk-bytes", type=int, default=0,
                   help="bytes a job may have on disk at once (output folder and, with --job-uids, /tmp); "
                        "past it the job is stopped; 0: no limit")
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="start every job in a fresh interpreter, never forked from a warm one (dropq_worker.warm)")
    p.add_argument("--preload", default="", metavar="MODULE,...",
                   help="modules each warm interpreter imports before forking jobs (those missing are skipped)")
    return p.parse_args(argv)


def _expand(args: argparse.Namespace) -> None:
    """Replace {host} in the paths with this container's hostname: replicas of one compose service
    share their mounts, and each keeps to its own subfolder of them."""
    host = socket.gethostname()
    for key in ("socket", "inputs", "jobs"):
        value = getattr(args, key)
        if value is not None and "{host}" in str(value):
            setattr(args, key, Path(str(value).replace("{host}", host)))
    if args.socket is not None:
        args.socket.parent.mkdir(parents=True, exist_ok=True)


def _job_uids(args: argparse.Namespace) -> tuple[isolation.JobUids | None, Launcher | None]:
    """The job uids of --job-uids, after checking the worker may use them and emptying its bounding set;
    and, for warm interpreters, the launcher of fork servers, forked just before that (launcher.py)."""
    if not args.job_uids:
        return None, None
    uids = isolation.parse_uids(args.job_uids, args.owner or "0:0")
    launcher = None
    if args.warm and os.geteuid() == 0:
        launcher = Launcher.start(args.python)
        procs.spare(launcher.pid)  # the worker's own child, not a job's leftover
    try:
        isolation.prepare_worker()
    except isolation.IsolationError:
        if launcher is not None:
            launcher.close()
        raise
    return uids, launcher


def _reclaim(jobs: Path, uids: isolation.JobUids) -> None:
    jobs.mkdir(parents=True, exist_ok=True)
    for name in isolation.reclaim(jobs, uids):
        log.warning("took back %s, left in staging by a job of a previous worker process", name)
    procs.kill_leftovers()  # reaps what reclaim killed, should any be this process's children


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _expand(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    token = os.environ.pop(args.token_env, None)
    if token and not procs.make_undumpable():
        log.warning("could not make the worker undumpable; jobs of the same uid could read its token")
    if args.listen and not token:
        print(f"dropq-worker: --listen requires a token in ${args.token_env}", file=sys.stderr)
        return 2
    if args.max_file_bytes:
        # set here once and inherited by every job; the worker's own files are capped below it anyway
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.max_file_bytes, args.max_file_bytes))
    try:
        uids, launcher = _job_uids(args)
        preload = warm.check_preloads([name for name in args.preload.split(",") if name])
    except (isolation.IsolationError, ValueError) as exc:
        print(f"dropq-worker: {exc}", file=sys.stderr)
        return 2
    if not procs.become_subreaper():
        log.warning("could not become a child subreaper; a job's escaped grandchildren may outlive it")
    for job_id in reap_abandoned(args.jobs):
        log.warning("killed the leftover processes of job %s from a previous worker process", job_id)
    if uids is not None:
        _reclaim(args.jobs, uids)
    runner = Runner(Settings(programs=args.programs, inputs=args.inputs, jobs=args.jobs, python=args.python,
                             envs=args.envs, uids=uids, max_disk_bytes=args.max_disk_bytes,
                             warm=args.warm, preload=preload), launcher)
    app = create_app(runner=runner, token=token, name=args.name)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    import waitress  # imported late: the daemon's tests import this module without serving

    try:
        if args.socket:
            if args.socket.exists() or args.socket.is_symlink():
                args.socket.unlink()
            server = waitress.create_server(app, unix_socket=str(args.socket), unix_socket_perms="600",
                                            threads=args.threads, ident="dropq-worker")
            if uids is not None:
                # the worker is root here: the socket goes to the daemon's uid (mode 0600, so to no job uid)
                os.chown(args.socket, uids.owner_uid, uids.owner_gid)
            server.run()
        else:
            host, _, port = args.listen.rpartition(":")
            waitress.serve(app, host=host, port=int(port), threads=args.threads, ident="dropq-worker", _quiet=True)
    finally:
        # stop the running job (its whole tree) before going: nothing may outlive its worker
        runner.shutdown()
        procs.kill_leftovers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
