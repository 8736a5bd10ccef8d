"""One writer per output folder: an OS file lock (flock) on OUTPUT/dotmoe.lock.

The lock belongs to the process that owns the run: in a multi-rank run that is global rank 0 (the
other ranks write only through collectives that rank 0 takes part in), so a run holds one lock,
not one per rank. The kernel releases a flock when the last descriptor of the open file closes,
i.e. when the process exits in any way (crash, SIGKILL, preemption): a dead run never leaves a
stale lock, and a requeued SLURM job takes the lock again as soon as the old job's rank 0 is gone.

The lock file is kept for the life of OUTPUT (--overwrite spares it); only a run refused before it
wrote anything removes the folder it created, lock file included (`discard`). Whoever locks checks
afterwards that the path still names the file it locked, and retries if not, so a lock file unlinked
meanwhile never gives two holders. Who holds the lock (host, pid, start time, SLURM job) is written
into the file for the refusal message; it is read only while the lock is held by someone.

Shared file systems: NFS (v4, or v3 with lockd) carries flock as a whole-file POSIX lock; Lustre
needs the `flock` mount option (without it flock fails with ENOSYS, reported as such).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "dotmoe.lock"


class RunLockError(RuntimeError):
    """OUTPUT is in use by another run (or cannot be locked); the message names the holder and the fix."""


@dataclass
class RunLock:
    path: Path
    fd: int
    created: bool = False      # acquire made the OUTPUT folder

    @classmethod
    def acquire(cls, output: str | Path) -> "RunLock":
        """Take the lock of `output` (created if missing) or raise RunLockError naming its holder."""
        output = Path(output).expanduser()
        if output.exists() and not output.is_dir():
            raise RunLockError(f"--output {output} is a file; choose a folder")
        created = not output.exists()
        path = output / LOCK_NAME
        while True:
            try:
                output.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)     # not inherited by exec'd children
            except FileNotFoundError:
                continue                  # a refused run removed the folder it had made: make it again
            except OSError as err:
                raise RunLockError(f"--output {output} cannot be created or written ({err.strerror}); choose a "
                                   "folder you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_holder(fd)
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLockError(
                        f"--output {output} is in use by another dotmoe run ({holder}; lock {path}): two runs "
                        "must not write one folder. Wait for that run to end or stop it, or choose another "
                        "--output") from None
                raise RunLockError(f"cannot lock {path} ({err.strerror}): the file system of --output does not "
                                   "support file locks (Lustre: mount with -o flock); choose an --output on one "
                                   "that does") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)                  # we locked a file someone unlinked meanwhile: lock the new one
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        if os.environ.get("SLURM_JOB_ID"):
            holder["slurm_job"] = os.environ["SLURM_JOB_ID"]
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        return cls(path=path, fd=fd, created=created)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Release, and if acquire made the folder and it holds nothing but the lock, remove both:
        a run refused in preflight leaves no trace."""
        if self.created and self.fd >= 0:
            others = [p for p in self.path.parent.iterdir() if p.name != LOCK_NAME]
            if not others:
                self.path.unlink(missing_ok=True)       # while still locked: see the module docstring
                self.release()
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass                                # another run is already starting in it
                return
        self.release()


def describe_holder(info: dict) -> str:
    if not info:
        return "holder not recorded yet: it is just starting"
    where = f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {info.get('started', '?')}"
    return where + (f", SLURM job {info['slurm_job']}" if info.get("slurm_job") else "")


def _read_holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return describe_holder(json.loads(raw) if raw else {})
    except (OSError, ValueError):
        return "holder unreadable"
