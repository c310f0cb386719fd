"""The `podrouter` console script: `podrouter run` without importing click (start-up time).

`podrouter run` is the one command whose start is measured (`status.ready_after`, from process
start, imports included; docs/benchmarks.md "Start-up time"), and click is about a tenth of it. So
`main()` recognises the plain forms of `run` itself, `run --config FILE [--log-level LEVEL]` (each
option once, as `--opt VALUE` or `--opt=VALUE`, in any order) and runs the daemon directly. Anything
else (other commands, --help, a repeated or unknown option, a missing or odd value, a directory as
the config, shell completion) goes to click (`podrouter.cli`), which parses and reports exactly as
before. Both paths run the same `run_daemon`, so the daemon cannot tell them apart.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from podrouter.config import Config

LOG_LEVELS = ("debug", "info", "warning", "error")  # `run --log-level` (click.Choice in cli.py)
EXIT_USAGE = 2


def fast_run_args(args: list[str]) -> tuple[str, str] | None:
    """(config, log level) when `args` (argv without the program) is a plain `run` that click would
    accept as it is; None for anything click should parse."""
    if not args or args[0] != "run" or "_PODROUTER_COMPLETE" in os.environ:
        return None
    opts: dict[str, str] = {}
    rest = args[1:]
    i = 0
    while i < len(rest):
        name, eq, value = rest[i].partition("=")
        if name not in ("--config", "--log-level") or name in opts:
            return None
        if not eq:
            if i + 1 >= len(rest):
                return None
            i += 1
            value = rest[i]
        if not value or value.startswith("-"):
            return None
        opts[name] = value
        i += 1
    config, level = opts.get("--config"), opts.get("--log-level", "info")
    if config is None or level not in LOG_LEVELS or not _path_ok(config):
        return None  # click says what is wrong (click.Choice, click.Path)
    return config, level


def _path_ok(path: str) -> bool:
    """What click.Path(dir_okay=False) accepts: a path that does not exist (the config loader then
    reports it), or one that is not a directory and is readable."""
    try:
        st = os.stat(path)
    except OSError:
        return True
    return not stat.S_ISDIR(st.st_mode) and os.access(path, os.R_OK)


def fail(lines: list[str] | str, code: int) -> NoReturn:
    """The CLI's one error style: each line on stderr, then exit with `code` (cli.py uses it too)."""
    for line in [lines] if isinstance(lines, str) else lines:
        print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def load_config(path: str) -> Config:
    """Load a config file; exit 2 naming each problem; print its warnings (cli.py uses it too)."""
    from podrouter import config as configmod

    try:
        cfg = configmod.load(path)
    except configmod.ConfigError as e:
        fail(e.problems, EXIT_USAGE)
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


def main() -> None:
    args = fast_run_args(sys.argv[1:])
    if args is None:
        from podrouter.cli import main as click_main

        click_main()
        return
    try:
        run_daemon(*args)
    except (EOFError, KeyboardInterrupt):
        # as click's standalone mode has it: an empty line, "Aborted!", status 1
        print(file=sys.stderr)
        print("Aborted!", file=sys.stderr, flush=True)
        sys.exit(1)
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
        sys.exit(1)  # click: a closed stdout/stderr pipe ends the command quietly


if __name__ == "__main__":
    main()
