"""argparse pieces shared by every CLI: one-line errors, real boolean flags, checked numbers.

Every numeric flag takes one of the ``type=`` helpers below, so a zero, negative,
NaN, infinite or out-of-range value is refused while parsing, before anything is
loaded or written. Output paths are checked with :func:`check_output_dir` /
:func:`check_output_file` at start-up, before any training.
"""
import argparse
import math
import os
import re
import tempfile

import torch

from .errors import UserError
from .schema import INPUT_SIZES, MAX_WIDTH_MULT

INT_MAX = 2 ** 31 - 1    # the largest count torch / DataLoader take as a C int
SEED_MAX = 2 ** 32 - 1   # np.random.seed's range


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one-line UserErrors (``run_cli`` prints them and exits 2)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


# ------------------------------------------------------------------ booleans
def str2bool(value):
    """Parse a boolean flag value; junk is an error (the released ``type=bool`` took "False" as True)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"'{value}' is not a boolean; expected true or false")


class BoolAction(argparse.Action):
    """``--flag``, ``--flag BOOL`` and ``--no-flag`` (the negation takes no value)."""

    _BARE = object()   # the flag was given without a value

    def __init__(self, option_strings, dest, negations=(), **kwargs):
        self.negations = tuple(negations)
        super().__init__(list(option_strings) + list(self.negations), dest, nargs="?",
                         const=self._BARE, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        negated = option_string in self.negations
        if values is self._BARE:
            value = not negated
        elif negated:
            parser.error(f"argument {option_string}: takes no value (got '{values}')")
        else:
            try:
                value = str2bool(values)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"argument {option_string}: {exc}")
        setattr(namespace, self.dest, value)


def bool_flag(parser, names, default, help_text):
    """A boolean flag in every released spelling: ``--flag``, ``--flag True/False``, ``--no-flag``.

    ``names`` is one option string or a list of aliases (e.g. ``["-e", "--evaluate", "--eval"]``);
    the negation is ``--no-`` + the first long name. A flag whose name already says "no"
    (``--no_plot``) gets no negation.
    """
    names = [names] if isinstance(names, str) else list(names)
    first_long = next(n for n in names if n.startswith("--"))[2:]
    negations = [] if first_long.startswith("no") else [f"--no-{first_long}"]
    shown = "unset" if default is None else default
    off = f"; {negations[0]} turns it off" if negations else ""
    return parser.add_argument(*names, action=BoolAction, negations=negations, default=default,
                               metavar="BOOL",
                               help=f"{help_text} (default {shown}{off})")


# ------------------------------------------------------------------ numbers
def _fmt(value):
    return str(value) if isinstance(value, int) else f"{value:g}"


def _interval(kind, lo, hi, lo_open, hi_open):
    lo, hi = _fmt(lo), None if hi is None else _fmt(hi)
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    noun = "an integer" if kind is int else "a finite number"
    if hi is None:
        return f"{noun} {'>' if lo_open else '>='} {lo}"
    return f"{noun} in {left}{lo}, {hi}{right}"


def number(kind, lo, hi=None, lo_open=False, hi_open=False):
    """argparse ``type=``: an int or finite float in the interval [lo, hi] (ends open on request).

    Integers are capped at :data:`INT_MAX` when ``hi`` is None, so a huge count fails
    here rather than deep inside torch.
    """
    if kind is int and hi is None:
        hi = INT_MAX
    expected = _interval(kind, lo, hi, lo_open, hi_open)
    noun = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"'{text}' is not {noun}; expected {expected}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"'{text}' is not finite; expected {expected}")
        too_low = value <= lo if lo_open else value < lo
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {expected}")
        return value

    parse.__name__ = expected
    return parse


positive_int = number(int, 1)
nonneg_int = number(int, 0)
seed_int = number(int, 0, SEED_MAX)
workers_int = number(int, 0, 1024)
threads_int = number(int, 1, 1024)
positive_float = number(float, 0.0, lo_open=True)
nonneg_float = number(float, 0.0)
fraction = number(float, 0.0, 1.0, lo_open=True)          # (0, 1]
unit_interval = number(float, 0.0, 1.0)                   # [0, 1]
below_one = number(float, 0.0, 1.0, hi_open=True)         # [0, 1): momentum, decays
learning_rate = number(float, 0.0, 10.0, lo_open=True)    # SGD/Adam diverge long before 10
width_mult = number(float, 0.0, MAX_WIDTH_MULT, lo_open=True)
bit_width = number(int, 1, 8)
input_size = number(int, *INPUT_SIZES)                     # pixels; the models' stems need >= 8


# ------------------------------------------------------------------ threads
def add_threads_argument(parser):
    """``--threads N``: torch's intra-op CPU threads. Unset, torch's own choice stands
    (OMP_NUM_THREADS if set, else the machine's cores). The count changes how reductions
    split, hence float rounding: a run reproduces bit for bit only at the same count."""
    return parser.add_argument(
        "--threads", type=threads_int, default=None, metavar="N",
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else torch's choice); "
             "the count used is logged")


def apply_threads(args):
    """Set torch's thread count when ``--threads`` was given; returns the count in effect
    (for the caller's log and saved settings)."""
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


# ------------------------------------------------------------------ names
_NAME_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def name_part(text):
    """argparse ``type=``: a piece of a file or folder name (no '/', no leading '.')."""
    if text and not _NAME_PART.fullmatch(text):   # "" = no suffix
        raise argparse.ArgumentTypeError(
            f"'{text}' is not usable in a folder name; expected letters, digits, '.', '_' and "
            "'-' (not starting with '.'), so the output stays a single folder under --output")
    return text


def same_file(a, b):
    """Whether paths ``a`` and ``b`` name one file (through links and other spellings too)."""
    return os.path.abspath(a) == os.path.abspath(b) or (
        os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def check_bit_range(min_bit, max_bit):
    """--min_bit may not exceed --max_bit (a cross-flag check argparse cannot make)."""
    if min_bit > max_bit:
        raise UserError(f"--min_bit {min_bit} > --max_bit {max_bit}; expected min_bit <= max_bit")


# ------------------------------------------------------------------ output paths
def _first_existing(path):
    """The nearest existing ancestor of ``path`` (itself if it exists)."""
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def check_output_dir(path, flag):
    """UserError unless ``path`` is (or can be created as) a writable folder; leaves nothing behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} '{path}' is a file; expected a folder for the outputs")
    _check_creatable(path, flag, "folder")


def check_output_file(path, flag):
    """UserError unless ``path`` can be written as a file; leaves nothing behind."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise UserError(f"{flag} '{path}' is a folder; expected a file path")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{flag} '{path}' is read-only; expected a writable file path")
    _check_creatable(os.path.dirname(os.path.abspath(path)), flag, "file")


def _check_creatable(folder, flag, what):
    base = _first_existing(folder)
    if not os.path.isdir(base):
        raise UserError(f"{flag}: '{base}' is a file, so the {what} '{folder}' cannot be "
                        "created under it; expected a path under a folder")
    try:   # a real probe: permission bits say nothing for root or on read-only mounts
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=base))
    except OSError as exc:
        raise UserError(f"{flag}: '{base}' is not writable ({exc.strerror}); expected a {what} "
                        "path you may write to") from exc
