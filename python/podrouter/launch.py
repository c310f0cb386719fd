"""What the two ways into the CLI share: the console script (entry.py, `podrouter run` without
click) and the click commands (cli.py). The error style (`fail`), config loading with its
warnings (`load_config`) and running the daemon (`run_daemon`) live here so that neither imports
the other for them: entry hands every other command to cli, and cli never imports entry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from podrouter.config import Config

LOG_LEVELS = ("debug", "info", "warning", "error")  # `run --log-level` (click.Choice in cli.py)
EXIT_USAGE = 2


def fail(lines: list[str] | str, code: int) -> NoReturn:
    """The CLI's one error style: each line on stderr, then exit with `code`."""
    for line in [lines] if isinstance(lines, str) else lines:
        print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def load_config(path: str) -> Config:
    """Load a config file; exit 2 naming each problem; print its warnings."""
    from podrouter import config as configmod
    from podrouter.errors import StartError

    try:
        cfg = configmod.load(path)
    except configmod.ConfigError as e:
        fail(e.problems, EXIT_USAGE)
    except StartError as e:  # the core's rulebook (podrouter._native) cannot be loaded
        fail(e.problems, e.code)
    for w in cfg.warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    return cfg


def run_daemon(config: str, log_level: str, handover: bool = False) -> NoReturn:
    """`podrouter run`: load the config (exit 2 naming each problem), set up logging, start
    forwarding from the forwarding snapshot if there is a usable one (startup.py: before the daemon
    and pyroute2 are imported), run the daemon until SIGTERM/SIGINT and exit with its status (at
    once after a quick stop: `quick_exit`)."""
    from podrouter import startup

    cfg = load_config(config)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, log_level.upper()),
        format=f"%(asctime)s podrouter[{cfg.node.name}] %(levelname)s %(message)s",
    )
    # pyroute2 logs every netlink message at DEBUG: far too much even for --log-level debug
    logging.getLogger("pyroute2").setLevel(max(logging.WARNING, logging.getLogger().level))
    fast = None
    if not handover:
        try:
            fast = startup.forward_first(cfg, logging.getLogger("podrouter"))
        except Exception:  # noqa: BLE001 - never worse than the normal start
            logging.getLogger("podrouter").exception("forward-first start failed; the normal start follows")
    from podrouter import daemon

    try:
        code = daemon.run(cfg, handover, fast, quick_exit)
    except daemon.StartError as e:
        fail(e.problems, e.code)
    sys.exit(code)


def quick_exit(code: int) -> NoReturn:
    """End the process now (after the daemon's quick stop): no interpreter teardown, no joining of
    threads; what the stop contract leaves is in the kernel, the fds are the keeper's."""
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
