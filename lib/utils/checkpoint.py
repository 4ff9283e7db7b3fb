"""Checkpoint and file I/O: atomic writes, tolerant state_dict loading.

Every file a run produces is written to a temporary file in the same folder and
renamed over the target, so a kill at any moment leaves either the old or the new
file, never half of one.
"""
import json
import logging
import os
import tempfile

import torch

from .errors import UserError

log = logging.getLogger(__name__)


def _atomic(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(obj, path):
    """torch.save ``obj`` to ``path`` atomically."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path, data):
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint file; a missing or unreadable file is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # corrupted / not a torch file
        raise UserError(f"checkpoint '{path}' could not be read ({type(exc).__name__}); "
                        "expected a file written by torch.save") from exc


def strip_prefix(state_dict, prefix="module."):
    """Drop the prefix DataParallel/DDP put in front of every key."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def extract_state_dict(ckpt):
    """The weights of a checkpoint dict ({'state_dict': ...}) or a bare state_dict."""
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict):
        raise UserError("checkpoint holds no state_dict; expected a dict with 'state_dict'")
    return strip_prefix(ckpt)


def load_state_dict(model, state_dict, source="checkpoint"):
    """Load weights non-strictly, reporting missing/unexpected keys and refusing shape clashes.

    Returns (missing, unexpected) key lists.
    """
    state_dict = strip_prefix(state_dict)
    own = model.state_dict()
    bad = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise UserError(f"{source} does not fit the model: '{k}' has shape "
                        f"{tuple(state_dict[k].shape)}, expected {tuple(own[k].shape)} "
                        f"({len(bad)} tensors differ; wrong --arch, --width_mult or dataset?)")
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys:
        log.info("%s: %d missing keys (kept as initialised): %s", source,
                 len(result.missing_keys), ", ".join(result.missing_keys[:6]))
    if result.unexpected_keys:
        log.warning("%s: %d unexpected keys ignored: %s", source,
                    len(result.unexpected_keys), ", ".join(result.unexpected_keys[:6]))
    return result.missing_keys, result.unexpected_keys


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
