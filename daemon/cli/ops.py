"""Commands that run or install the daemon: run, service, image."""

from __future__ import annotations

import argparse
import logging
import sys

from dropq.cli.exits import Exit
from dropq.config import Config


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from dropq.ops import logs
    from dropq.ops.service import run

    logs.setup(args.log_level or config.log_level, args.log_format or config.log_format)
    return run(config)


def cmd_service(config: Config, args: argparse.Namespace) -> int:
    from dropq.ops import systemd

    if args.service_command == "unit":
        print(systemd.unit_text(config, exe=systemd.dropq_executable()), end="")
        return Exit.OK
    for line in systemd.install(config, name=args.name, unit_dir=args.unit_dir, user=args.user, start=args.now):
        print(line)
    return Exit.OK


def cmd_image(config: Config, args: argparse.Namespace) -> int:
    from dropq.pools.image import DEFAULT_MIRROR, build

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="dropq: %(message)s")
    if args.offline:
        print("dropq: --offline is deprecated (it needs a Debian mirror, not no network): use --from-debian, "
              "with --mirror URL for a local mirror", file=sys.stderr)
    from_debian = args.from_debian or args.offline or args.mirror is not None
    if args.agent:
        from dropq.pools.agent_image import AGENT_IMAGE, build_agent

        print(build_agent(args.tag or AGENT_IMAGE, from_debian=from_debian, mirror=args.mirror or DEFAULT_MIRROR,
                          force=args.force))
        return Exit.OK
    print(build(args.tag or config.workers.docker.image, from_debian=from_debian,
                mirror=args.mirror or DEFAULT_MIRROR, force=args.force))
    return Exit.OK
