"""Checkpoint and file I/O: atomic writes, safe loading, strict state_dict loading.

Every file a run produces is written to a temporary file in the same folder and
renamed over the target, so a kill at any moment leaves either the old or the new
file, never half of one. A kill during a write leaves its temporary file
(``.tmp-<pid>-<random>-<name>``) behind; the next write of that target, or
:func:`remove_stale_tmp` when a run starts on its folder, deletes it.

Checkpoints hold only tensors, numbers, strings, lists, tuples and dicts, and are
read with ``torch.load(..., weights_only=True)``: loading a file never runs code
(docs/design.md section 12).
"""
from collections import OrderedDict
import errno
import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import warnings

import torch

from .errors import UserError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(r"^\.tmp-(?:(\d+)-)?.*?-(.+)$")
# What a checkpoint may hold: what torch.load(weights_only=True) reads back. Scalars are
# matched by exact type: numpy's float64 and str_ subclass float and str but pickle as numpy.
PLAIN_SCALARS = (str, int, float, bool, type(None))
PLAIN_OBJECTS = (torch.Tensor, torch.Size)
# Keys a checkpoint may lack without leaving the model wrong (see load_state_dict).
OPTIONAL_KEY_SUFFIXES = ("num_batches_tracked", "activation_range", "weight_range")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def remove_stale_tmp(folder, target=None):
    """Delete temporary files that killed writes left in ``folder`` (only ``target``'s if given).

    A temporary file is stale when the process named in it no longer runs (files
    without a process id, from older versions, are always stale), so a write in
    progress in another process on this machine is never disturbed. Returns the
    removed names.
    """
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in os.listdir(folder):
        m = _TMP_NAME.match(name)
        if not m or (target is not None and m.group(2) != target):
            continue
        pid = m.group(1)
        if pid is not None and (int(pid) == os.getpid() or _pid_alive(int(pid))):
            continue
        try:
            os.remove(os.path.join(folder, name))
            removed.append(name)
        except FileNotFoundError:   # another process cleaned it first
            continue
    if removed:
        log.info("removed %d unfinished temporary file(s) of an interrupted run in %s: %s",
                 len(removed), folder, ", ".join(removed[:4]))
    return removed


def atomic_write(path, write):
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then rename it into place.

    The file gets the mode a plain ``open()`` would give (mkstemp makes it 0600),
    so outputs and caches are readable by the group as the umask allows. A full disk
    is a UserError naming ``path`` and the space left; the old file stays as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_tmp(folder, os.path.basename(path))
    try:
        _write_then_rename(folder, path, write)
    except (OSError, RuntimeError) as exc:
        if not _disk_full(exc):
            raise
        raise UserError(_disk_full_message(path, folder, exc)) from None


def _write_then_rename(folder, path, write):
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}{os.getpid()}-",
                               suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# torch.save's zip writer reports a failed write as a RuntimeError with one of these, not an OSError
_TORCH_WRITE_FAILED = ("unexpected pos", "pytorchstreamwriter failed", "file write failed")


def _disk_full(exc):
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    return any(mark in str(exc).lower() for mark in _TORCH_WRITE_FAILED)


def _disk_full_message(path, folder, exc):
    """One line: the path, why the write failed, and the space left in ``folder``."""
    if isinstance(exc, OSError):
        reason = exc.strerror or os.strerror(exc.errno)
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        reason = f"torch.save's writer failed ({first[:120]}), as it does on a full disk"
    try:
        free = shutil.disk_usage(folder).free
        left = f"{free / 2 ** 30:.2f} GiB" if free >= 2 ** 30 else f"{free / 2 ** 20:.1f} MiB"
    except OSError:
        left = "unknown space"
    return (f"could not write '{path}': {reason}; {left} free in '{folder}' (the previous "
            "file is kept; free some space there or write elsewhere)")


def check_plain(obj, where="checkpoint"):
    """Raise TypeError unless ``obj`` holds only plain scalars, tensors, lists, tuples and dicts.

    Called before every save, so a file that ``load_checkpoint`` would refuse is
    never written (numpy arrays and scalars must be converted by the caller).
    """
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_plain(k, f"{where} key")
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif type(obj) not in PLAIN_SCALARS and not isinstance(obj, PLAIN_OBJECTS):
        raise TypeError(f"{where} is a {type(obj).__name__}; a checkpoint holds only tensors, "
                        "numbers, strings, lists and dicts")


def save_checkpoint(obj, path):
    """torch.save ``obj`` (plain types only, see :func:`check_plain`) to ``path`` atomically."""
    check_plain(obj)
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def _no_constant(name):
    raise ValueError(f"{name} is not a number in strict JSON")


def read_json(path, what, expected):
    """Strict JSON (NaN/Infinity refused) of ``path``; every failure is a one-line UserError.

    ``what`` names the file in the message ("strategy file"), ``expected`` says what it should be.
    """
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' not found; expected {expected}")
    try:
        with open(path) as f:
            return json.load(f, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:   # a ValueError too: before the NaN branch below
        raise UserError(f"{what} '{path}' is not text (a binary file?); expected "
                        f"{expected}") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} '{path}' is not valid JSON (line {exc.lineno}, column "
                        f"{exc.colno}: {exc.msg}); expected {expected}") from exc
    except RecursionError as exc:
        raise UserError(f"{what} '{path}' is nested too deeply to read; expected {expected}") \
            from exc
    except ValueError as exc:
        raise UserError(f"{what} '{path}' is not strict JSON ({exc}); expected finite numbers "
                        "or null") from exc
    except OSError as exc:
        raise UserError(f"{what} '{path}' could not be read ({type(exc).__name__}); expected "
                        f"{expected}") from exc


def finite_or_none(value):
    """``value`` as a float, or None when it is NaN/inf (strict JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def atomic_write_json(path, obj):
    """Write strict JSON: a NaN or inf anywhere is a ValueError (callers pass None instead)."""
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint file; a missing or unreadable file is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' not found")
    try:
        with warnings.catch_warnings():
            # torch warns about a foreign pickle protocol before refusing the file below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():   # a class or function: unpickling it could run code
            raise UserError(f"checkpoint '{path}' holds objects other than tensors, numbers, "
                            "strings, lists and dicts; refused (loading it could run code); "
                            "expected a file written by this project") from None
        with open(path, "rb") as f:
            is_pickle = f.read(1) == b"\x80"   # PROTO opcode: a raw pickle, not torch.save's zip
        if is_pickle:
            raise UserError(f"checkpoint '{path}' is not a plain torch.save file (its pickle uses "
                            "instructions the safe loader refuses); refused without running it; "
                            "expected a file written by this project") from None
        raise UserError(f"checkpoint '{path}' could not be read (UnpicklingError); "
                        "expected a file written by torch.save") from None
    except Exception as exc:  # corrupted / not a torch file
        raise UserError(f"checkpoint '{path}' could not be read ({type(exc).__name__}); "
                        "expected a file written by torch.save") from exc


def strip_prefix(state_dict, prefix="module."):
    """Drop the prefix DataParallel/DDP put in front of every key."""
    return {(k[len(prefix):] if isinstance(k, str) and k.startswith(prefix) else k): v
            for k, v in state_dict.items()}


def extract_state_dict(ckpt):
    """The weights of a checkpoint dict ({'state_dict': ...}) or a bare state_dict."""
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict):
        raise UserError("checkpoint holds no state_dict; expected a dict with 'state_dict'")
    return strip_prefix(ckpt)


def _names(keys, n=4):
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(f"'{k}'" for k in keys[:n]) + more


def _shape(value):
    return tuple(value.shape) if torch.is_tensor(value) else f"<{type(value).__name__}>"


def with_module_versions(model, state_dict):
    """``state_dict`` carrying ``model``'s module versions where it carries none.

    A state_dict stored through a plain dict loses PyTorch's ``_metadata`` (each module's
    ``_version``), and modules that check it on load refuse it (torchvision's MNASNet:
    "version should be set to 1 or 2 instead of None"). Files without it come from this
    code's own models, so the model's current versions are the right ones.
    """
    if getattr(state_dict, "_metadata", None) is not None:
        return state_dict
    fitted = OrderedDict(state_dict)
    fitted._metadata = getattr(model.state_dict(), "_metadata", None)
    return fitted


def load_state_dict(model, state_dict, source="checkpoint"):
    """Load weights into ``model``, refusing any that do not fit; returns (missing, unexpected).

    Every *weight* of the model must be in ``state_dict`` with the model's shape
    and hold only finite values, else a UserError names the first offenders. The
    weights are all entries of ``model.state_dict()`` except those ending in
    :data:`OPTIONAL_KEY_SUFFIXES`: BatchNorm's ``num_batches_tracked`` (a step
    counter, unused with a fixed momentum) and QConv2d/QLinear's
    ``activation_range``/``weight_range``, which a Q model's float twin checkpoint
    lacks and calibration sets. Those may be missing (returned in ``missing``).
    Keys the model does not have are ignored with a warning (``unexpected``).
    """
    state_dict = strip_prefix(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    required = [k for k in missing if not k.endswith(OPTIONAL_KEY_SUFFIXES)]
    if required:
        n_weights = sum(not k.endswith(OPTIONAL_KEY_SUFFIXES) for k in own)
        raise UserError(f"{source} does not fit the model: {len(required)} of its {n_weights} "
                        f"weights are missing ({_names(required)}); expected a checkpoint of "
                        "this --arch, --width_mult and dataset")
    bad = [k for k, v in state_dict.items() if k in own and tuple(own[k].shape) != _shape(v)]
    if bad:
        k = bad[0]
        raise UserError(f"{source} does not fit the model: '{k}' has shape "
                        f"{_shape(state_dict[k])}, expected {tuple(own[k].shape)} "
                        f"({len(bad)} tensors differ; wrong --arch, --width_mult or dataset?)")
    # copy_() would cast int64 codes or rounded weights silently into float parameters
    cast = [k for k, v in state_dict.items() if k in own and own[k].is_floating_point()
            and not v.is_floating_point()]
    if cast:
        k = cast[0]
        raise UserError(f"{source} holds {str(state_dict[k].dtype)[6:]} values in "
                        f"{_names(cast)}; expected floating-point weights ({len(cast)} tensors "
                        "are not)")
    nonfinite = [k for k, v in state_dict.items() if k in own and torch.is_tensor(v)
                 and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise UserError(f"{source} holds NaN/inf values in {_names(nonfinite)}; expected "
                        "finite weights (a diverged training run?)")
    result = model.load_state_dict(with_module_versions(model, state_dict), strict=False)
    if missing:
        log.info("%s: %d optional buffers missing (kept as initialised): %s", source,
                 len(missing), ", ".join(missing[:6]))
    if result.unexpected_keys:
        log.warning("%s: %d unexpected keys ignored: %s", source,
                    len(result.unexpected_keys), ", ".join(result.unexpected_keys[:6]))
    return missing, result.unexpected_keys


def load_pretrained(model, path, hint=None):
    """Load pretrained weights from ``path`` into ``model``; returns the checkpoint dict.

    A missing file is a one-line UserError naming the path and how to obtain it.
    """
    if not os.path.isfile(path):
        how = hint or "train one with pretrain.py or pass --pretrained_path"
        raise UserError(f"pretrained weights '{path}' not found; {how}")
    ckpt = load_checkpoint(path)
    load_state_dict(model, extract_state_dict(ckpt), source=path)
    return ckpt if isinstance(ckpt, dict) else {}


def file_sha256(path):
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (weights files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
