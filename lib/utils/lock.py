"""One run per output folder: an exclusive lock held for the run's life.

The lock is ``fcntl.flock`` on ``.lock`` inside the folder. The kernel drops it when the
holder's file is closed, which includes any exit (a crash or ``kill -9`` too), so a lock
file left by a dead process blocks nothing: the next run takes the lock and rewrites the
file. The file records the holder's pid, host and start time, only for the refusal message.
flock is advisory and local to one machine's kernel: it keeps two runs of this project
apart, not other programs, and not two machines sharing a network folder.
"""
import contextlib
import datetime
import fcntl
import os
import socket

from .errors import UserError

LOCK_FILE = ".lock"


class FolderLock:
    """Exclusive claim of ``folder`` (made if missing); a context manager.

    ``flag`` names the option that chose the folder, for the refusal message. ``wait``:
    block until the holder lets go instead of refusing (a shared cache's builders queue).
    """

    def __init__(self, folder, flag="output folder", wait=False):
        self.folder, self.flag, self.wait = folder, flag, wait
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd = None
        self.created = False

    def acquire(self):
        if self.fd is not None:
            return self
        self.created = not os.path.isdir(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(f"{self.flag} '{self.folder}' is in use by another run "
                                f"({holder}); expected one run per folder: wait for it to "
                                "end or choose another folder") from None
            except OSError as exc:   # ENOLCK, EOPNOTSUPP: a mount without flock
                os.close(fd)
                with contextlib.suppress(OSError):   # leave nothing behind
                    os.unlink(self.path)
                    if self.created:
                        os.rmdir(self.folder)
                raise UserError(f"{self.flag} '{self.folder}': its file system refuses flock "
                                f"({exc.strerror}); expected a folder on a local disk or a mount "
                                "with locking (docs/multinode.md)") from exc
            if _same_file(fd, self.path):
                self.fd = fd
            else:   # the holder removed the file between our open and flock: take the new one
                os.close(fd)
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n"
                 .encode())
        return self

    def release(self):
        """Remove the lock file, then drop the lock; also the folder if this lock made it and
        nothing else was written there."""
        if self.fd is None:
            return
        try:   # removed while still held, so no other run can lock the old file meanwhile
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created:
            try:
                os.rmdir(self.folder)
            except OSError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _same_file(fd, path):
    try:
        a, b = os.stat(path), os.fstat(fd)
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    except FileNotFoundError:
        return False


def _read_holder(fd):
    """What the holder wrote into the lock file (it may not have written it yet)."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return " ".join(text.split()) or "its pid not yet recorded"
