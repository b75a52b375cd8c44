"""`dropq agent` (run jobs of a daemon on this host) and `dropq agents init` (a token and a certificate for a
first deployment). Neither reads config.yaml: an agent's host has none, and init writes what the config names."""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

from dropq.cli.console import say
from dropq.cli.exits import Exit
from dropq.errors import DropqError


def add_parsers(sub: Any) -> None:
    agent = sub.add_parser(
        "agent", help="run a daemon's jobs on this host's own pool (a worker host of a dropq daemon)",
        description="Connect out to a dropq daemon's agents API, lease its jobs and run them on this host's "
                    "own pool (local processes or docker containers, with their usual isolation), N at a time. "
                    "Needs no config.yaml (README: More than one host).",
        epilog="example: dropq agent --server https://queue.example:8788 --token-file /run/secrets/dropq_agent "
               "--ca /etc/dropq/agents.crt --pool docker --workers 4")
    agent.add_argument("--server", required=True, metavar="URL", help="the daemon's agents.listen address, "
                       "http(s)://HOST:PORT")
    agent.add_argument("--token-file", required=True, metavar="PATH", help="the file holding agents.token_file's token")
    agent.add_argument("--pool", choices=["local", "docker"], default="local", help="where jobs run (default: local)")
    agent.add_argument("--workers", type=_count, default=1, metavar="N", help="jobs at once (default: 1)")
    agent.add_argument("--name", help="this agent's name: its workers are NAME-w1... (default: the host name)")
    agent.add_argument("--work-dir", metavar="DIR", help="its workers' folders, the programs it fetched, and an "
                       "optional agent.yaml (workers:, jobs:) (default: /var/lib/dropq-agent as root, else "
                       "~/.local/state/dropq-agent)")
    agent.add_argument("--ca", metavar="PATH", help="the certificate to trust for an https daemon (the one "
                       "`dropq agents init` made); default: the system's")
    agents = sub.add_parser("agents", help="agents: set up a first deployment")
    agents_sub = agents.add_subparsers(dest="agents_command", required=True, metavar="ACTION")
    init = agents_sub.add_parser(
        "init", help="write an agents token and a self-signed certificate",
        description="Write agents.token (0600) and, unless --no-tls, agents.crt and agents.key (a self-signed "
                    "certificate for the names given, made with the openssl command) into DIR, and print the "
                    "config.yaml section that uses them. Existing files are kept.")
    init.add_argument("--dir", default="agents", metavar="DIR", help="where to write them (default: ./agents)")
    init.add_argument("--name", action="append", default=[], metavar="HOST",
                      help="a host name or IP address agents reach the daemon by (repeatable; default: localhost, "
                           "127.0.0.1 and this host's name)")
    init.add_argument("--no-tls", action="store_true", help="only the token (plain HTTP on loopback)")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError("from 1 to 256")
    return value


def cmd_agent(args: argparse.Namespace) -> int:
    from dropq.agent import run

    return run(args)


def cmd_agents_init(args: argparse.Namespace) -> int:
    folder = Path(args.dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "agents.token"
    if not token.exists():
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        say(f"wrote {token}")
    tls = ""
    if not args.no_tls:
        cert, key = folder / "agents.crt", folder / "agents.key"
        if not cert.exists() or not key.exists():
            names = args.name or ["localhost", "127.0.0.1", os.uname().nodename]
            alt = ",".join(f"IP:{n}" if _is_ip(n) else f"DNS:{n}" for n in names)
            try:
                subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                                "-nodes", "-days", "3650", "-subj", f"/CN={names[0]}", "-addext",
                                f"subjectAltName={alt}", "-keyout", str(key), "-out", str(cert)],
                               check=True, capture_output=True, text=True)
            except FileNotFoundError:
                raise DropqError("the openssl command is needed to make a certificate (or use --no-tls)") from None
            except subprocess.CalledProcessError as exc:
                raise DropqError(f"openssl could not make a certificate: {exc.stderr.strip()}") from None
            os.chmod(key, 0o600)
            say(f"wrote {cert} and {key} (for {', '.join(names)})")
        tls = f"\n  tls: {{cert: {cert}, key: {key}}}"
    say(f"\nin config.yaml:\nagents:\n  listen: \"{'0.0.0.0' if tls else '127.0.0.1'}:8788\"\n"
        f"  token_file: {token}{tls}\n\non each agent host: dropq agent --server "
        f"{'https' if tls else 'http'}://THIS-HOST:8788 --token-file PATH-TO-A-COPY-OF-{token.name}"
        f"{' --ca PATH-TO-A-COPY-OF-agents.crt' if tls else ''}")
    return int(Exit.OK)


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
