"""A training run's folder, kept safe: nothing of a run is lost to another run, a signal or a full disk.

- A fresh run into a folder that holds a run is refused (before anything is built or written);
  ``--resume`` continues it, ``--overwrite`` moves it aside to a sibling folder (never deletes it)
  and says where.
- A lock file (``.lock``, holding the owner's pid and host, created with ``O_EXCL``) keeps a second
  run out of a folder in use; the lock of a process that no longer runs on this host is taken over.
- SIGINT and SIGTERM ask the run to stop after the current step: it writes a checkpoint and ends
  with :class:`Interrupted` (exit 128 + the signal: 130, 143); a second signal stops at once.
- A read-only or full disk ends the run with :class:`DiskError` naming the file; the last complete
  checkpoint stays as it was (every file is written atomically, :mod:`evit.checkpoint`).
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from .outputs import check_folder_destination

#: what a folder holding a run contains (any one of them)
RUN_FILES = ("config.json", "checkpoints", "model.safetensors", "best.safetensors", "summary.csv")
LOCK = ".lock"
#: errors of a disk that cannot take what the run writes
DISK_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (holds a run, in use by another process)."""


class DiskError(ValueError):
    """The disk refused a write of the run (read-only, full, no permission)."""


class Interrupted(Exception):
    """The run stopped on a signal, its last checkpoint written; the command exits ``128 + signum``."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def holds_run(out: Path) -> list[str]:
    """The names in ``out`` that show it holds a run (empty when it does not, or does not exist)."""
    return [name for name in RUN_FILES if (out / name).exists()]


def _owner(lock: Path) -> tuple[Optional[int], str]:
    """(pid, host) written in ``lock``; pid None when the file is unreadable or not a lock of ours."""
    try:
        pid, _, host = lock.read_text().strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


class RunLock:
    """``out/.lock`` held by this process until :meth:`release` (or the end of a ``with`` block)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK
        self.held = False

    def check(self) -> bool:
        """Refuse (RunFolderError) when a live process holds the lock; True when a stale one lies there."""
        if not self.path.exists():
            return False
        pid, host = _owner(self.path)
        if pid is not None and host == socket.gethostname() and pid != os.getpid() and not _alive(pid):
            return True  # the lock of a process that no longer runs: to be taken over
        who = f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "") \
            if pid is not None else "another process"
        raise RunFolderError(f"{self.path.parent} is in use by {who} (lock {self.path}); wait for that run "
                             f"to end, or delete {self.path} if no run uses the folder")

    def acquire(self) -> "RunLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self.check():
                    self.path.unlink(missing_ok=True)  # a stale lock of a dead process: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            return self
        raise RunFolderError(f"cannot take the lock {self.path}: it keeps coming back")

    def release(self) -> None:
        if self.held and _owner(self.path)[0] == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _aside(out: Path) -> Path:
    """A new sibling folder for the earlier run: ``OUT.old-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, ... if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        target = out.with_name(f"{out.name}.old-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            target.mkdir()
            return target
        except FileExistsError:
            continue
    raise RunFolderError(f"cannot find a free name beside {out} to move the earlier run to")


class RunFolder:
    """The folder of one run: checked before anything is built (:meth:`check` writes nothing, so a run
    refused for its data or options makes no folder), claimed just before the first write (:meth:`claim`:
    locked, an earlier run moved aside with ``overwrite``), released when the run ends."""

    def __init__(self, out: Path, resume: bool = False, overwrite: bool = False) -> None:
        self.out, self.resume, self.overwrite = Path(out), resume, overwrite
        self.lock: Optional[RunLock] = None

    def check(self) -> None:
        """Refuse --resume with --overwrite, an --out that is a file, a folder in use by a live process, and a
        fresh run (neither ``resume`` nor ``overwrite``) into a folder that holds a run."""
        if self.resume and self.overwrite:
            raise RunFolderError("give --resume (continue the run in --out) or --overwrite (move it aside), not both")
        try:
            check_folder_destination(self.out, "--out")
        except ValueError as e:
            raise RunFolderError(str(e)) from None
        if self.lock is None:  # held by this run once claimed
            RunLock(self.out).check()
        found = holds_run(self.out)
        if found and not (self.resume or self.overwrite):
            raise RunFolderError(f"{self.out} already holds a run ({', '.join(found)}); use --resume to continue it "
                                 "or --overwrite to move it aside")

    def claim(self) -> Optional[Path]:
        """Lock the folder (made if need be) and check it again under the lock; with ``overwrite``, move
        everything in it to a new sibling folder, never deleting it. Returns where it went, else None."""
        self.check()
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.out).acquire()
        self.check()  # what another process may have done since
        if not (self.overwrite and holds_run(self.out)):
            return None
        moved = _aside(self.out)
        for entry in self.out.iterdir():
            if entry.name != LOCK:
                shutil.move(str(entry), str(moved / entry.name))
        return moved

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def kept(out: Path, advice: str = "resume with --resume") -> str:
    """What of the run in ``out`` is safe: its last complete checkpoint and how to continue, for a message."""
    from .checkpoint import latest

    try:
        found = latest(Path(out) / "checkpoints")
    except (OSError, ValueError):
        found = None
    if found is None:
        return "no checkpoint had been written yet"
    return (f"the last complete checkpoint (step {found['step']}) in {Path(out) / 'checkpoints'} is intact"
            + (f": {advice}" if advice else ""))


def disk_error(e: OSError, out: Path) -> Optional[DiskError]:
    """A one-line DiskError for ``e`` when it is the disk refusing a write (else None: not ours to explain)."""
    if e.errno not in DISK_ERRNOS:
        return None
    advice = "resume with --resume once the disk takes writes"
    return DiskError(f"cannot write {e.filename or out}: {e.strerror or e}; {kept(out, advice)}")


class StopSignals:
    """While installed (a ``with`` block in the main thread), SIGINT and SIGTERM are noted in ``received``
    once :meth:`defer` was called: the training loop stops after the current step, writing a checkpoint.
    Before that, or on a second signal, :class:`Interrupted` is raised at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.deferring = False
        self._old: dict = {}

    def defer(self) -> None:
        self.deferring = True

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None or not self.deferring:
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}")
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}
