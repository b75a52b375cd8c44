"""A warm interpreter: forks each job's Python program from an interpreter that has already started.

Run by the interpreter of the job's environment (the environment's `bin/python`, or the worker's
`--python`), never imported by the worker: it uses the standard library only, and only modules that
are built in or C extensions, so that a job finds in `sys.modules` nearly what a fresh interpreter has
(plus `_socket`, `marshal`, and whatever was preloaded).

    python forkserver.py FD [MODULE ...]
    python -I -S forkserver.py FD --job-uids [MODULE ...]

The server runs as the worker's uid and its children stay that uid; or, with `--job-uids` (started by
launcher.py as `python -I -S forkserver.py FD --job-uids`), as root holding only SETUID, SETGID and
SETPCAP, and each child becomes its job's uid before anything of the job's environment runs (see
_drop and _site: the server itself can import the standard library only, and its preloads are the
worker's, never a program's). FD is one end of an AF_UNIX
SOCK_SEQPACKET socketpair whose other end the worker (`dropq_worker.warm`) holds. The server imports
the MODULEs (the preloads), says `ready`, then serves one job at a time, single-threaded, and never
runs a job's code itself:

    worker -> server   the request (marshal bytes, which the server does not read: see below), with
                       three descriptors (SCM_RIGHTS): the job's stdout and stderr (pipes the worker
                       reads) and `go`, the read end of a pipe the worker writes one byte into
    server -> worker   ("pid", PID) once the child is set up (own session, descriptors, rlimits,
                       cwd), or ("error", TEXT) when that failed (as a Popen whose exec failed);
                       then ("exit", PID, CODE) when it ended (CODE as Popen's returncode)
    worker -> server   b"reap" once it is done with the pid: the server reaps the child only then

The child runs the program only after reading `go`: a worker that lost the server before it learnt the
pid closes `go` instead, and the child leaves without running anything, so a job the worker then
starts fresh never runs twice. The exit status is read with waitid(WNOWAIT) and sent before the child
is reaped: should the server die in between, the zombie is re-parented to the worker (a child
subreaper), which still reads it.

The request is parsed only in the child, and the server zeroes its receive buffer after each fork: the
server's memory, which every later job inherits, never holds an earlier job's arguments or
environment variables.
"""

import _signal
import _socket
import _weakref
import marshal
import os
import sys

#: no `typing` at run time (the jobs would find it imported): annotations are strings, read by mypy only
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any

#: the largest request the server takes (the worker starts larger ones fresh)
MAX_REQUEST = 256 * 1024
#: a child that failed to set up exits with this, after telling the server why
SETUP_FAILED = 127

_HERE = os.path.abspath(__file__)


def _initial_signals() -> "tuple[dict[int, Any], set[Any]]":
    """The signal handlers and mask as the interpreter set them at start, to restore in each child."""
    handlers = {}
    for signum in range(1, _signal.NSIG):
        try:
            handlers[signum] = _signal.getsignal(signum)
        except (OSError, ValueError):
            continue
    return handlers, _signal.pthread_sigmask(_signal.SIG_BLOCK, [])


def _send(sock: "_socket.socket", *message: "Any") -> None:
    sock.sendmsg([marshal.dumps(message, 4)])


def _say(text: str) -> None:
    # never through sys.stderr: its buffer would be copied into every child
    os.write(2, ("dropq fork server: " + text + "\n").encode("utf-8", "backslashreplace"))


def _preload(names: "list[str]") -> "list[str]":
    failed = []
    for name in names:
        try:
            __import__(name)
        except BaseException as exc:  # noqa: BLE001 - a preload that fails is skipped; the job imports it itself
            failed.append(name)
            _say(f"could not preload {name}: {type(exc).__name__}: {exc}")
    return failed


#: with --job-uids: prctl() and ctypes.get_errno, taken at start; ctypes itself then leaves sys.modules,
#: so that a job finds there what a fresh interpreter has
_PRCTL: "Any" = None
_ERRNO: "Any" = None
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24


def _take_prctl() -> None:
    global _PRCTL, _ERRNO
    before = set(sys.modules)
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
    _ERRNO = ctypes.get_errno
    for name in set(sys.modules) - before:
        del sys.modules[name]
    # the server itself: no process may read its memory (nothing of a job is in it, but nothing need be)
    _PRCTL(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _drop(uid: int, gid: int) -> None:
    """Become the job's uid for good, as the worker's fresh start does (Popen user=, group=,
    extra_groups=[], from a worker whose bounding set is empty), and check it: raises otherwise."""
    cap = 0
    while cap < 64:
        if _PRCTL(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if _ERRNO() != 22:  # EINVAL: past the last capability this kernel knows
                raise OSError(_ERRNO(), f"could not drop capability {cap} from the bounding set")
            break
        cap += 1
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise OSError("the job's process did not become the job's uid")
    with open("/proc/self/status", "rb") as fh:
        for line in fh.read().splitlines():
            if line.startswith(b"Cap") and int(line.split()[1], 16) != 0:
                raise OSError(f"the job's process still holds capabilities ({line.decode()})")
    # set-uid cleared it; a fresh start's exec sets it again (its /proc files are its own, as a program expects)
    _PRCTL(_PR_SET_DUMPABLE, 1, 0, 0, 0)


def serve(fd: int, preloads: "list[str]") -> "dict[str, Any] | None":
    """Serve requests until the worker closes its end. Returns only in a forked child: its request."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, fd)
    initial = _initial_signals()
    # the worker's package folder is not the job's: nothing may be imported from it (a preload named
    # like one of its modules), and each child puts its program's folder first instead
    if sys.path and os.path.dirname(_HERE) == os.path.abspath(sys.path[0]):
        del sys.path[0]
    os.chdir("/")
    if preloads[:1] == ["--job-uids"]:
        _take_prctl()
        # the worker's own preloads (launcher.py): sys.path is the standard library alone here
        preloads = preloads[1:]
    failed = _preload(preloads)
    # what the server holds now (its preloads) goes out of the collector's sight: a collection in a child
    # would otherwise walk, and so copy, every page of it
    import gc
    gc.collect()
    gc.freeze()
    _send(sock, "ready", os.getpid(), failed)
    buf = bytearray(MAX_REQUEST)
    view = memoryview(buf)
    zeros = bytes(MAX_REQUEST)
    fdsize = len((0).to_bytes(4, sys.byteorder))
    while True:
        try:
            n, ancillary, flags, _ = sock.recvmsg_into([buf], _socket.CMSG_SPACE(3 * fdsize))
        except ConnectionResetError:
            return None
        if n == 0 and not ancillary:
            return None  # the worker closed its end: it is gone or done with this server
        fds: list[int] = []
        for level, kind, data in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                usable = len(data) - len(data) % fdsize
                fds.extend(int.from_bytes(data[i:i + fdsize], sys.byteorder) for i in range(0, usable, fdsize))
        if len(fds) != 3 or flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
            for extra in fds:
                os.close(extra)
            view[:n] = zeros[:n]
            _send(sock, "error", "the request to the fork server was malformed or too large")
            continue
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            request = bytes(view[:n])
            sock.detach()  # its descriptor is closed below; the object must never close a reused number
            return _become(request, fds, ready_w, initial)
        view[:n] = zeros[:n]
        os.close(ready_w)
        for each in fds:
            os.close(each)
        _report(sock, pid, ready_r)


def _report(sock: "_socket.socket", pid: int, ready_r: int) -> None:
    """Tell the worker the child's pid once it is set up (or why it could not be), then its end."""
    chunks = []
    while True:
        chunk = os.read(ready_r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(ready_r)
    said = b"".join(chunks)
    if said == b"ok":
        _send(sock, "pid", pid)
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    assert info is not None  # without WNOHANG, waitid waits for the child
    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
    if said != b"ok":
        _send(sock, "error", said[1:].decode("utf-8", "replace") or "the job's process ended while being set up")
    else:
        _send(sock, "exit", pid, code)
        # reaped only once the worker is done with the pid (it kills the process group by that number
        # after the end): until then no new process can take the number
        try:
            sock.recv(16)
        except OSError:
            pass  # the worker is gone: reap, and the next receive ends the server
    os.waitpid(pid, 0)


def _become(request: bytes, fds: "list[int]", ready_w: int,
            initial: "tuple[dict[int, Any], set[Any]]") -> "dict[str, Any]":
    """In the child: become the job's process (what Popen and exec would have made), wait for `go`."""
    stdout_w, stderr_w, go_r = fds
    try:
        os.setsid()
        job = marshal.loads(request)
        handlers, mask = initial
        for signum, handler in handlers.items():
            if _signal.getsignal(signum) is not handler:
                _signal.signal(signum, handler)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
        null = os.open("/dev/null", os.O_RDWR)  # as subprocess.DEVNULL opens it
        for source, target in ((null, 0), (stdout_w, 1), (stderr_w, 2)):
            os.dup2(source, target)
        # only the standard three survive, and the two the handshake still needs, moved above them
        keep = sorted({go_r, ready_w})
        low = 3
        for fd in keep:
            if fd > low:
                os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 30)
        _limits_and_uid(job)
        os.chdir(job["cwd"])
    except BaseException as exc:  # noqa: BLE001 - whatever failed, the worker must hear it, and the child go
        os.write(ready_w, f"E{exc}".encode("utf-8", "replace"))
        os._exit(SETUP_FAILED)
    os.write(ready_w, b"ok")
    os.close(ready_w)
    go = os.read(go_r, 1)
    os.close(go_r)
    if go != b"g":
        os._exit(SETUP_FAILED)  # the worker gave up on this start: the job is started fresh instead
    return job


def _limits_and_uid(job: "dict[str, Any]") -> None:
    """The job's rlimits and OOM score, then (job uids) its uid: before anything that is the job's, its
    folder, its environment's site, its code."""
    if job["rlimits"]:
        import resource  # a C module; imported only for a job with limits of its own (memory:)
        for resource_id, soft, hard in job["rlimits"]:
            resource.setrlimit(resource_id, (soft, hard))
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:  # the job dies first, never the worker
            fh.write("1000")
    except OSError:
        pass  # no /proc: nothing to adjust
    if _PRCTL is not None:
        _drop(job["uid"], job["uid"])
    elif job.get("uid") is not None:
        raise OSError("this fork server cannot run a job under a uid of its own")


def _prepare(job: "dict[str, Any]") -> "Any":
    """The interpreter's state as a fresh `python PROGRAM ARGS` would have it: environ, argv, path[0],
    seeds, caches that depend on the environment, and a new `__main__` module."""
    os.environ.clear()
    os.environ.update(job["env"])
    time = sys.modules.get("time")
    if time is not None and hasattr(time, "tzset"):
        time.tzset()  # TZ may differ from the server's
    site: Any = sys.modules.get("site")
    if _PRCTL is not None:
        _site(job)
    elif site is not None and getattr(site, "USER_SITE", None) is not None:
        site.USER_BASE = None
        site.USER_SITE = None
        site.getusersitepackages()  # computed from the job's HOME, as a fresh start does
    tempfile: Any = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile.tempdir = None  # found again from the job's TMPDIR
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()  # `random` reseeds itself after fork; numpy's global state does not
    script = job["script"]
    sys.argv[:] = job["argv"][1:]
    sys.orig_argv[:] = job["argv"]
    old_first = sys.path[0] if sys.path else None
    sys.path.insert(0, job["path0"])
    sys.path_importer_cache.pop(os.path.dirname(_HERE), None)
    if old_first is not None and old_first == os.path.dirname(_HERE):
        sys.path.remove(old_first)
    for finder in sys.meta_path:
        invalidate = getattr(finder, "invalidate_caches", None)
        if invalidate is not None:
            invalidate()
    main: Any = type(sys)("__main__")
    main.__loader__ = type(__loader__)("__main__", script)  # type: ignore[name-defined]  # a script's loader, as for ours
    main.__annotations__ = {}
    main.__builtins__ = sys.modules["builtins"]
    main.__file__ = script
    main.__cached__ = None
    sys.modules["__main__"] = main
    return main


def _site(job: "dict[str, Any]") -> None:
    """What a fresh start of the job's interpreter does before the program, for a server started `-I -S`:
    sys.executable (the environment's bin/python, whose pyvenv.cfg `site` reads), the variables -I made it
    ignore (only PYTHONDONTWRITEBYTECODE and PYTHONNOUSERSITE reach here: warm.py starts a job with any
    other PYTHON* variable fresh), and `site` itself: the environment's site-packages and `.pth` files,
    the user site, as the job's uid (never the server's)."""
    env = job["env"]
    sys.executable = job["executable"]
    sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))
    import site as site_module
    site: Any = site_module
    site.ENABLE_USER_SITE = not env.get("PYTHONNOUSERSITE") and os.getuid() == os.geteuid()
    site.main()
    site.enablerlcompleter()  # what site.main() does when the interpreter is not isolated
    sys.flags = _flags(sys.flags, dont_write_bytecode=int(sys.dont_write_bytecode),  # type: ignore[misc]
                       no_user_site=int(not site.ENABLE_USER_SITE), no_site=0, ignore_environment=0,
                       isolated=0, safe_path=False)


def _flags(real: "Any", **fresh: "Any") -> "Any":
    """sys.flags as a fresh start would show them (those -I -S set, as without), for the Python code that
    reads them: `site`, and subprocess's flags for child interpreters (multiprocessing's spawn), which
    would otherwise start them without site. The type cannot be made anew: this is a tuple like it."""
    names = type(real).__match_args__
    values = tuple(fresh.get(name, getattr(real, name)) for name in names)

    class flags(tuple):  # named as the real type, for its repr
        __slots__ = ()
        __match_args__ = names

        def __repr__(self) -> str:
            return "sys.flags(" + ", ".join(f"{n}={v!r}" for n, v in zip(names, self, strict=True)) + ")"

    for i, name in enumerate(names):
        setattr(flags, name, _field(i))
    flags.__module__ = "sys"
    return flags(values)


def _field(i: int) -> property:
    return property(lambda self: self[i])


def _ours(tb: "TracebackType | None") -> "TracebackType | None":
    """The traceback without the frames of this file, which a fresh interpreter would not have."""
    while tb is not None and tb.tb_frame.f_code.co_filename == _HERE:
        tb = tb.tb_next
    return tb


def run(job: "dict[str, Any]") -> None:
    """Run the program as the interpreter runs a script, then end the process as the interpreter's
    shutdown would (see _finish)."""
    main = _prepare(job)
    warm = set(sys.modules) - {"__main__"}
    interrupted = False
    try:
        with open(job["script"], "rb") as fh:
            source = fh.read()
        code = compile(source, job["script"], "exec", dont_inherit=True)
        del source
        exec(code, main.__dict__)  # noqa: S102 - running the job's program is what the child is for
        status = 0
    except SystemExit as exc:
        status = _system_exit(exc)
    except BaseException as exc:  # noqa: BLE001 - what an uncaught exception does in a fresh interpreter
        tb = _ours(exc.__traceback__)
        exc.__traceback__ = tb
        sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
        sys.excepthook(type(exc), exc, tb)
        interrupted = isinstance(exc, KeyboardInterrupt)
        status = 1
    del main
    _finish(status, interrupted, warm)


def _system_exit(exc: SystemExit) -> int:
    """The exit status of an uncaught SystemExit, its message printed as the interpreter prints it."""
    value = exc.code
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    try:
        sys.stderr.write(f"{value}\n")
    except Exception:  # noqa: BLE001 - a sys.stderr the program broke: the message goes to fd 2 itself
        _write_stderr(f"{value}\n")
    return 1


def _finish(status: int, interrupted: bool, warm: "set[str]") -> None:
    """End the child as the interpreter's shutdown would, less the part that costs: non-daemon threads
    waited for, atexit handlers run, then the program's own modules torn down (its `__main__` and every
    module imported since the fork, newest first, their globals cleared as the interpreter clears them,
    then a garbage collection: finalizers run and unclosed files are flushed), the standard streams
    flushed, and _exit. What only the preloaded modules hold is not finalized: tearing down every
    module (numpy...) in a forked copy touches, and so copies, most of its memory, which took 3 ms
    of a trivial job and 16 ms of one with a dozen stdlib packages preloaded."""
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()
    import atexit
    atexit._run_exitfuncs()
    # as the interpreter's shutdown: the modules leave sys.modules, what only they held is collected
    # (finalizers running with their globals intact), and the globals of those still alive are cleared
    alive = []
    for name in reversed(list(sys.modules)):
        if name not in warm:
            module: Any = sys.modules[name]
            if isinstance(module, type(sys)):  # a program may put anything in sys.modules
                alive.append(_weakref.ref(module))
            sys.modules[name] = None  # type: ignore[assignment]
    module = None
    import gc
    gc.collect()
    for ref in alive:
        _clear(ref())
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception as exc:  # noqa: BLE001 - as the interpreter: said, and the status is 120
            _write_stderr(f"Exception ignored in: {stream!r}\n{type(exc).__name__}: {exc}\n")
            status = 120
    if interrupted:
        # an uncaught KeyboardInterrupt: the interpreter ends by SIGINT, so its parent sees the signal
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
        os.kill(os.getpid(), _signal.SIGINT)
    os._exit(status)


def _write_stderr(text: str) -> bool:
    """Write to fd 2 if it takes it (at the very end, with no one left to tell otherwise)."""
    try:
        os.write(2, text.encode("utf-8", "backslashreplace"))
    except OSError:
        return False
    return True


def _clear(module: "Any") -> None:
    """A module's globals set to None as the interpreter's shutdown does: names with one leading
    underscore first, then the rest but __builtins__."""
    namespace = getattr(module, "__dict__", None)
    if not isinstance(namespace, dict):
        return
    for name in list(namespace):
        if name.startswith("_") and not name.startswith("__"):
            namespace[name] = None
    for name in list(namespace):
        if name != "__builtins__":
            namespace[name] = None


if __name__ == "__main__":
    _job = serve(int(sys.argv[1]), sys.argv[2:])
    if _job is None:
        os._exit(0)  # the server's own end: nothing to finalize
    del _job["rlimits"]
    run(_job)  # never returns: the child ends in _finish
