"""Reading a JSON file that is untrusted input (the state file, the forwarding snapshot): opened
without following a symlink, a regular file only, optionally only one this user owns and nobody
else may write, read up to a size bound, decoded strictly. Each problem is a `Refused` whose text
names it; the caller adds which file it was and what happens instead."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any


class Refused(ValueError):
    """The file must not be used: why, in a few words."""


def read(path: Path, max_bytes: int, *, private: bool = False) -> Any | None:
    """The decoded JSON document, or None when there is no file. `private`: the file must also be
    owned by this process's user and not writable by group or others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Refused(f"cannot open it: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # before fdopen, which refuses a directory itself
        os.close(fd)
        raise Refused("not a regular file")
    with os.fdopen(fd, "rb") as f:
        if private and st.st_uid != os.geteuid():
            raise Refused(f"owned by uid {st.st_uid}, not {os.geteuid()}")
        if private and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise Refused("writable by others")
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise Refused(f"larger than {max_bytes} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Refused(f"not JSON: {str(e)[:200]}") from None
