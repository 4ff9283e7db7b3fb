"""Tab-separated per-epoch log (log.txt) and logging setup."""
import logging
import os
import sys

from .checkpoint import atomic_write_text


def trim_log(path, next_index):
    """Drop the rows of ``path`` whose first column is >= ``next_index`` (header kept).

    A run killed after logging a row but before saving its state repeats that
    row's work when resumed; trimming to the saved state first keeps each row once.
    """
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = lines[:1] + [ln for ln in lines[1:] if ln and int(ln.split("\t")[0]) < next_index]
    atomic_write_text(path, "\n".join(kept) + "\n")


class Logger:
    """Appends one tab-separated row per call to ``path``; a header row names the columns.

    With ``resume=True`` an existing file is appended to (its header is kept).
    Each row is flushed at once so a killed run keeps every finished epoch.
    """

    def __init__(self, path, names, resume=False):
        exists = resume and os.path.exists(path)
        self.names = list(names)
        self.file = open(path, "a" if exists else "w")
        if not exists:
            self.file.write("\t".join(self.names) + "\n")
            self.file.flush()

    def append(self, values):
        if len(values) != len(self.names):
            raise ValueError(f"expected {len(self.names)} values, got {len(values)}")
        cells = [f"{v:.6f}" if isinstance(v, float) else str(v) for v in values]
        self.file.write("\t".join(cells) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def setup_logging(verbose=False, rank=0):
    """Log to stderr; ranks other than 0 only log warnings."""
    level = logging.DEBUG if verbose else logging.INFO
    if rank != 0:
        level = logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
