"""Lookup tables: per-layer cost at every (weight bits, activation bits) pair.

A table has shape ``(n_layers, max_bit, max_bit)`` and is indexed
``[layer, w_bit - 1, a_bit - 1]`` (docs/design.md, hardware cost models), the format
of the table the HAQ release ships. Units per metric are in :data:`UNITS`. Tables are
cached as
``lookup_tables/{arch}_{dataset}_{size}px_w{width}_batch{B}_{hardware}_{metric}_table.npy``
(docs/design.md, data: the name carries everything that changes the table, so
tables of different sizes or widths never overwrite each other).
"""
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch.nn as nn

from lib.simulator.hardware import get_hardware, hardware_for
from lib.simulator.shapes import extract_layer_shapes
from lib.utils.checkpoint import atomic_write
from lib.utils.errors import UserError

log = logging.getLogger(__name__)

METRICS = ("latency", "energy", "size")
UNITS = {"latency": "ms", "energy": "mJ", "size": "bit"}
CACHE_DIR = Path(__file__).resolve().parent / "lookup_tables"


def check_metric(hardware, metric):
    """Raise UserError unless ``hardware`` (a cost model) models ``metric``."""
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; expected one of: {', '.join(METRICS)}")
    if metric not in hardware.metrics:
        hint = " or ".join(hardware_for(metric))
        raise UserError(f"hardware '{hardware.name}' models {' and '.join(hardware.metrics)} only, "
                        f"not {metric}" + (f"; use --hardware {hint} for {metric}" if hint else ""))


def build_table(model_or_shapes, hardware, metric, max_bit=8, input_size=224, batch=1,
                linear=False):
    """Cost table ``(n_layers, max_bit, max_bit)``, entry [i, w-1, a-1] in UNITS[metric].

    ``model_or_shapes`` is an ``nn.Module`` (traced at ``input_size`` and ``batch``
    with :func:`extract_layer_shapes`) or a list of LayerShape. ``hardware`` is a
    preset name or cost model, which must model ``metric`` and, unless the metric is
    size, operands of ``max_bit`` bits.
    """
    hw = get_hardware(hardware)
    check_metric(hw, metric)
    if isinstance(model_or_shapes, nn.Module):
        shapes = extract_layer_shapes(model_or_shapes, input_size, batch=batch, linear=linear)
    else:
        shapes = list(model_or_shapes)
    if metric != "size" and max_bit > hw.max_bit:
        raise UserError(f"{hw.label} supports at most {hw.max_bit}-bit operands; "
                        f"use --max_bit {hw.max_bit}")
    table = np.empty((len(shapes), max_bit, max_bit), dtype=np.float64)
    for i, shape in enumerate(shapes):
        for w in range(1, max_bit + 1):
            for a in range(1, max_bit + 1):
                table[i, w - 1, a - 1] = hw.table_entry(shape, w, a, metric)
    return table


def table_path(arch, dataset, hardware, metric, batch, cache_dir=CACHE_DIR, input_size=224,
                width_mult=None):
    """Cache file of a table: arch, dataset (an ImageFolder path by its last component), input
    size, width, batch, hardware and metric."""
    from lib.utils.data_utils import dataset_label
    name = getattr(hardware, "name", hardware)
    width = 1.0 if width_mult is None else float(width_mult)
    return Path(cache_dir) / (f"{arch}_{dataset_label(dataset)}_{input_size}px_w{width:g}_"
                              f"batch{batch}_{name}_{metric}_table.npy")


def save_table(table, path, meta=None):
    """Write ``table`` (then its ``.meta.json`` sidecar, if given) atomically.

    The sidecar goes last: a crash in between leaves a stale fingerprint, which
    only causes a rebuild, never a wrong table.
    """
    path = Path(path)
    atomic_write(path, lambda f: np.save(f, table, allow_pickle=False))
    if meta is not None:
        atomic_write(_meta_path(path),
                     lambda f: f.write(json.dumps(meta, indent=1, allow_nan=False).encode()))


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
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        log.warning("unreadable cached table %s (%s): rebuilding", path, exc)
        return None


def get_table(arch, dataset, hardware, metric, batch, model=None, input_size=None,
              cache_dir=CACHE_DIR, max_bit=8, linear=False, width_mult=None, rebuild=False):
    """Load the cached table or build it (from ``model`` or the registry's ``arch``) and cache it.

    The cache is keyed by that file name plus a ``.meta.json`` sidecar
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
                          width_mult=width_mult, linear=linear)

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


def table_record(data, path):
    """``{"path", "sha256"}`` of a user table: what strategy.json and the search state record."""
    return {"path": os.path.abspath(path), "sha256": hashlib.sha256(data).hexdigest()}


NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}


def _check_npy_header(f, path, expected):
    """Shape and dtype from the open .npy file's header, checked before any data is read."""
    start = f.read(len(NPY_MAGIC))
    if start[:2] == b"PK":   # a zip archive: .npz
        raise UserError(f"cost table '{path}' is an .npz archive; expected a single .npy array "
                        f"of shape {expected} (np.save)")
    if start != NPY_MAGIC:
        raise UserError(f"cost table '{path}' is not a .npy file (it does not start with "
                        f"\\x93NUMPY); expected an array of shape {expected} saved by np.save")
    f.seek(0)
    try:
        version = np.lib.format.read_magic(f)
        if version not in _NPY_HEADERS:
            raise ValueError(f"format version {version[0]}.{version[1]} is not supported")
        shape, _, dtype = _NPY_HEADERS[version](f)
    except ValueError as exc:
        raise UserError(f"cost table '{path}' has an unreadable .npy header "
                        f"({str(exc).splitlines()[0][:100]}); expected an array of shape "
                        f"{expected} saved by np.save") from None
    if dtype.hasobject:
        raise UserError(f"cannot read cost table '{path}' as .npy (it holds pickled objects); "
                        f"expected a numeric array of shape {expected}")
    if dtype.kind not in "iuf":
        raise UserError(f"cost table '{path}' holds {dtype.name} values; expected real numbers "
                        f"(integer or float) of shape {expected}")
    if shape != expected:
        raise UserError(f"cost table '{path}' has shape {shape}; expected {expected} "
                        "indexed [layer, w_bit-1, a_bit-1]")
    size = f.tell() + int(np.prod(shape)) * dtype.itemsize
    if os.fstat(f.fileno()).st_size != size:
        raise UserError(f"cost table '{path}' is {os.fstat(f.fileno()).st_size} bytes; its header "
                        f"describes {size} (a truncated or padded file?)")


def _read_user_table(path, expected, expected_sha256=None):
    """(bytes, record) of the table file at ``path``, its header and size checked before it is
    read whole, and its content against a recorded hash if given."""
    if not os.path.isfile(path):
        raise UserError(f"cost table '{path}' not found; expected a .npy array file")
    with open(path, "rb") as f:
        _check_npy_header(f, path, expected)
        f.seek(0)
        data = f.read()
    record = table_record(data, path)
    if expected_sha256 is not None and record["sha256"] != expected_sha256:
        raise UserError(f"cost table '{path}' has changed since the search recorded it (sha256 "
                        f"{record['sha256'][:12]}..., recorded {expected_sha256[:12]}...); "
                        "expected the table the search used")
    return data, record


def _check_monotone(table, path):
    """A wider operand never costs less: a table falling as bits grow (e.g. its axes swapped
    or reversed) would make every budget look unreachable or free."""
    for axis, kind in ((1, "weight"), (2, "activation")):
        falls = np.argwhere(np.diff(table, axis=axis) < 0)
        if len(falls):
            layer, w, a = (int(v) for v in falls[0])
            wider = (layer, w + (axis == 1), a + (axis == 2))
            raise UserError(f"cost table '{path}': layer {layer} costs {table[layer, w, a]:g} at "
                            f"w{w + 1}a{a + 1} but {table[wider]:g} at w{wider[1] + 1}a"
                            f"{wider[2] + 1}; expected costs that do not fall as {kind} bits "
                            "grow (index [layer, w_bit-1, a_bit-1])")


def load_user_table(path, n_layers, max_bit=8, expected_sha256=None):
    """Load a user-measured table (``--cost_table``) and check its shape and values.

    Returns ``(table, record)``: the float64 array and its ``{"path", "sha256"}``
    record (docs/design.md, strategy.json). With ``expected_sha256`` (a recorded table) a file
    whose content has changed is refused. The reference cost (the sum of the
    all-8-bit entries ``table[:, 7, 7]``) must be positive and finite, since every
    cost ratio divides by it.
    """
    expected = (n_layers, max_bit, max_bit)
    data, record = _read_user_table(path, expected, expected_sha256)
    table = np.load(io.BytesIO(data), allow_pickle=False)
    table = table.astype(np.float64)
    if not np.all(np.isfinite(table)) or np.any(table < 0):
        raise UserError(f"cost table '{path}' must hold finite non-negative numbers")
    with np.errstate(over="ignore"):
        reference = table[:, min(8, max_bit) - 1, min(8, max_bit) - 1].sum()
    if not (np.isfinite(reference) and reference > 0):
        raise UserError(f"cost table '{path}': the reference cost (sum of the w8a8 entries "
                        f"[:, 7, 7]) is {reference}; expected a positive finite number")
    _check_monotone(table, path)
    return table, record
