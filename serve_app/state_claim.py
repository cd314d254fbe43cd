"""One writer for a state dir at a time.

The gateway and the response store are detached actors that Ray restarts elsewhere when
their node stops answering. A node cut off but not dead (a frozen host, a network
partition) wakes up later with the old process still running: it would answer the calls
queued while it was frozen and write into the same dir as its replacement (the same
usage record twice, write-ahead segments of the same number). So each process claims
its dir when it starts, and checks the claim before every write; the one that finds it
replaced ends its process, and its callers retry with the actor that holds the claim.

The claim is the number in `<dir>/<name>.claim`, one higher than the last, written to a
temporary file and renamed over it. A rename gives the file a new inode, so the check
is one `stat`: the same inode and time mean the same claim.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

log = logging.getLogger("serve_app.state_claim")


def end_process() -> NoReturn:
    """Ray has a replacement running: no cleanup, no further write, no restart asked for."""
    os._exit(1)


class StateClaim:
    def __init__(
        self, folder: Path, name: str, on_lost: Callable[[], NoReturn] = end_process
    ) -> None:
        self.path = folder / f"{name}.claim"
        self.on_lost = on_lost
        self.number = self._read() + 1
        try:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with open(tmp, "w") as f:
                f.write(str(self.number))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            # a full or read-only disk: this process serves (what it refuses to write is
            # refused for that reason), and still yields to one that claims after it
            log.error("could not claim %s (%s)", self.path, exc)
            self.number = self._read()
        self._stamp = self._stat()

    def _read(self) -> int:
        try:
            return int(self.path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def held(self) -> bool:
        """Whether no process has claimed the dir since this one did."""
        stamp = self._stat()
        if stamp == self._stamp:
            return True
        if self._read() > self.number:
            return False
        self._stamp = stamp  # rewritten, not claimed (a copy of the dir, a touch)
        return True

    def check(self) -> None:
        """Before a write: end here if another process holds the claim."""
        if not self.held():
            log.error(
                "%s was claimed by a newer process (this one was cut off and replaced): "
                "ending without writing",
                self.path,
            )
            self.on_lost()
