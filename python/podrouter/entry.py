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

import errno
import os
import stat
import sys

from podrouter.launch import LOG_LEVELS, run_daemon  # shared with cli.py, which never imports entry


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
