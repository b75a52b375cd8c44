"""The `dropq` command line. Errors are one clear line on stderr and a named exit code.

`main` (the console script `dropq`) parses the arguments, loads the config and runs one command;
each command lives in the module named after what it is about.
"""

from __future__ import annotations

import os
import sys

from dropq.cli import schema
from dropq.cli.agents import cmd_agent, cmd_agents_init
from dropq.cli.console import say
from dropq.cli.env import cmd_env
from dropq.cli.exits import Exit
from dropq.cli.job import cmd_cancel, cmd_logs, cmd_show
from dropq.cli.jobs import cmd_jobs
from dropq.cli.ops import cmd_image, cmd_run, cmd_service
from dropq.cli.parser import build_parser, config_path
from dropq.cli.prune import cmd_prune
from dropq.cli.status import cmd_status, cmd_workers
from dropq.cli.submit import cmd_retry, cmd_submit
from dropq.config import Config
from dropq.errors import ConfigError, DaemonRunning, DropqError, NoDaemon, NotYours, PoolError, SchemaError, StoreError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    program_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, program_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.program_args = program_args
    if args.command == "schema":  # describes the files, so it needs no config.yaml to read
        return schema.run(args)
    try:
        if args.command in ("agent", "agents"):  # an agent's host has no config.yaml; init writes what it names
            return cmd_agent(args) if args.command == "agent" else cmd_agents_init(args)
        config = Config.load(config_path(args, os.environ))
        return int(COMMANDS[args.command](config, args))
    except (ConfigError, SchemaError) as exc:
        return _fail(Exit.CONFIG, str(exc))
    except (DaemonRunning, NoDaemon, PoolError) as exc:
        return _fail(Exit.DAEMON, str(exc))
    except StoreError as exc:
        return _fail(Exit.NOT_FOUND, str(exc))
    except NotYours as exc:  # the system's refusal, put in words: SYSTEM, as a permission is
        return _fail(Exit.SYSTEM, str(exc))
    except DropqError as exc:
        return _fail(Exit.USAGE, str(exc))
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(Exit.SYSTEM, f"{exc.strerror or exc}{where}")
    except KeyboardInterrupt:
        return 130


def _fail(code: Exit, message: str) -> int:
    # messages quote job ids, file names and manifest keys: escaped, like every line the CLI writes
    say(f"dropq: {message}", out=sys.stderr)
    return int(code)


COMMANDS = {"run": cmd_run, "submit": cmd_submit, "status": cmd_status, "show": cmd_show, "image": cmd_image,
            "cancel": cmd_cancel, "workers": cmd_workers, "logs": cmd_logs, "retry": cmd_retry,
            "service": cmd_service, "jobs": cmd_jobs, "env": cmd_env,
            "prune": cmd_prune}
