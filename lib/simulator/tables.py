"""Lookup tables: per-layer cost at every (weight bits, activation bits) pair.

A table has shape ``(n_layers, max_bit, max_bit)`` and is indexed
``[layer, w_bit - 1, a_bit - 1]`` (DESIGN.md section 5), the format of the table
the HAQ release ships. Units per metric are in :data:`UNITS`. Tables are cached as
``lookup_tables/{arch}_{dataset}_{size}px_w{width}_batch{B}_{hardware}_{metric}_table.npy``
(DESIGN.md section 7: the name carries everything that changes the table, so
tables of different sizes or widths never overwrite each other).
"""
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch.nn as nn

from lib.simulator.hardware import get_hardware, layer_cost
from lib.simulator.shapes import extract_layer_shapes
from lib.utils.errors import UserError

log = logging.getLogger(__name__)

METRICS = ("latency", "energy", "size")
UNITS = {"latency": "ms", "energy": "mJ", "size": "bit"}
CACHE_DIR = Path(__file__).resolve().parent / "lookup_tables"



def check_metric(hardware, metric):
    """Raise UserError unless ``hardware`` (a config) models ``metric``."""
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; expected one of: {', '.join(METRICS)}")
    if metric not in hardware.metrics:
        raise UserError(f"hardware '{hardware.name}' models {' and '.join(hardware.metrics)} only, "
                        f"not {metric}; use --hardware bitfusion for energy")


def _entry(shape, w, a, hw, metric):
    if metric == "size":
        return float(w * shape.n_weights)     # bits; the activation width does not matter
    cost = layer_cost(shape, w, a, hw)
    return cost.latency_ms if metric == "latency" else cost.energy_mj


def build_table(model_or_shapes, hardware, metric, max_bit=8, input_size=224, batch=1,
                linear=False):
    """Cost table ``(n_layers, max_bit, max_bit)``, entry [i, w-1, a-1] in UNITS[metric].

    ``model_or_shapes`` is an ``nn.Module`` (traced at ``input_size`` and ``batch``
    with :func:`extract_layer_shapes`) or a list of LayerShape. ``hardware`` is a
    preset name or config; BISMO models latency (and size) only.
    """
    hw = get_hardware(hardware)
    check_metric(hw, metric)
    if isinstance(model_or_shapes, nn.Module):
        shapes = extract_layer_shapes(model_or_shapes, input_size, batch=batch, linear=linear)
    else:
        shapes = list(model_or_shapes)
    if metric != "size" and max_bit > 8 and hw.name == "bitfusion":
        raise UserError("BitFusion supports at most 8-bit operands; use --max_bit 8")
    table = np.empty((len(shapes), max_bit, max_bit), dtype=np.float64)
    for i, shape in enumerate(shapes):
        for w in range(1, max_bit + 1):
            for a in range(1, max_bit + 1):
                table[i, w - 1, a - 1] = _entry(shape, w, a, hw, metric)
    return table


def _dataset_tag(dataset):
    """A file-name-safe name of a dataset (an ImageFolder root is named by its last folder)."""
    tag = os.path.basename(os.path.normpath(str(dataset))) or "dataset"
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in tag)


def table_path(arch, dataset, hardware, metric, batch, cache_dir=CACHE_DIR, input_size=224,
               width_mult=None):
    """Cache file of a table: arch, dataset, input size, width, batch, hardware and metric."""
    name = getattr(hardware, "name", hardware)
    width = 1.0 if width_mult is None else float(width_mult)
    return Path(cache_dir) / (f"{arch}_{_dataset_tag(dataset)}_{input_size}px_w{width:g}_"
                              f"batch{batch}_{name}_{metric}_table.npy")


def _atomic_write(path, write):
    """Call ``write(file)`` on a temp file next to ``path``, then os.replace it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_table(table, path, meta=None):
    """Write ``table`` (then its ``.meta.json`` sidecar, if given) atomically.

    The sidecar goes last: a crash in between leaves a stale fingerprint, which
    only causes a rebuild, never a wrong table.
    """
    path = Path(path)
    _atomic_write(path, lambda f: np.save(f, table))
    if meta is not None:
        _atomic_write(_meta_path(path), lambda f: f.write(json.dumps(meta, indent=1).encode()))


def _meta_path(path):
    return Path(path).with_suffix(".meta.json")


def fingerprint(shapes, hw, metric, max_bit):
    """Hash of everything a table depends on: layer shapes, hardware parameters, metric."""
    rows = [(s.name, s.kind, s.M, s.K, s.N, s.groups, s.kernel, s.n_inputs, s.n_weights,
             s.n_outputs) for s in shapes]
    text = repr((rows, repr(hw), metric, max_bit))
    return hashlib.sha1(text.encode()).hexdigest()


def _cached(path, key):
    """The cached table at ``path`` if its sidecar's fingerprint is ``key``, else None."""
    meta = _meta_path(path)
    if not (path.exists() and meta.exists()):
        return None
    try:
        if json.loads(meta.read_text()).get("fingerprint") != key:
            log.warning("cached table %s was built for another model or hardware: rebuilding", path)
            return None
        return np.load(path)
    except (ValueError, OSError) as exc:
        log.warning("unreadable cached table %s (%s): rebuilding", path, exc)
        return None


def get_table(arch, dataset, hardware, metric, batch, model=None, input_size=None,
              cache_dir=CACHE_DIR, max_bit=8, linear=False, width_mult=None, rebuild=False):
    """Load the cached table or build it (from ``model`` or the registry's ``arch``) and cache it.

    The cache is keyed by the DESIGN.md file name plus a ``.meta.json`` sidecar
    holding a fingerprint of the layer shapes and hardware, so a table built for
    another width, input size or simulator version is rebuilt rather than reused.
    ``input_size`` defaults to the dataset's; ``width_mult`` names the MobileNet width
    (of ``model`` when given) in the cache file.
    """
    hw = get_hardware(hardware)
    check_metric(hw, metric)
    if input_size is None or model is None:
        from lib.utils.data_utils import dataset_info
        num_classes, default_size = dataset_info(dataset)
        input_size = input_size or default_size
    if model is None:
        from models import get_model
        model = get_model(arch, num_classes=num_classes, input_size=input_size,
                          width_mult=width_mult)

    start = time.perf_counter()
    shapes = extract_layer_shapes(model, input_size, batch=batch, linear=linear)
    path = table_path(arch, dataset, hw, metric, batch, cache_dir, input_size, width_mult)
    key = fingerprint(shapes, hw, metric, max_bit)
    table = None if rebuild else _cached(path, key)
    if table is not None:
        log.info("loaded cost table %s", path)
        return table
    table = build_table(shapes, hw, metric, max_bit=max_bit)
    meta = {"fingerprint": key, "arch": arch, "dataset": dataset, "hardware": hw.name,
            "metric": metric, "unit": UNITS[metric], "batch": batch, "input_size": input_size,
            "width_mult": width_mult,
            "index": "[layer, w_bit-1, a_bit-1]", "layers": [s.name for s in shapes]}
    save_table(table, path, meta)
    log.info("built %s table %s in %.2f s", metric, path, time.perf_counter() - start)
    return table


def load_user_table(path, n_layers, max_bit=8):
    """Load a user-measured table (``--cost_table``) and check its shape and values."""
    expected = (n_layers, max_bit, max_bit)
    if not os.path.isfile(path):
        raise UserError(f"cost table '{path}' not found; expected a .npy array of shape {expected}")
    try:
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read cost table '{path}' as .npy ({exc}); "
                        f"expected an array of shape {expected}") from None
    if table.shape != expected:
        raise UserError(f"cost table '{path}' has shape {table.shape}; expected {expected} "
                        "indexed [layer, w_bit-1, a_bit-1]")
    if not np.issubdtype(table.dtype, np.number) or not np.all(np.isfinite(table)) \
            or np.any(table < 0):
        raise UserError(f"cost table '{path}' must hold finite non-negative numbers")
    return table.astype(np.float64)
