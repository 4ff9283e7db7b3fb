"""Reading a packed file (layout: :mod:`lib.export.packed`), trusting none of its fields.

In order: the magic; the header's length (capped); the header, inflated with a cap and parsed
as strict JSON; its schema (:mod:`lib.export.schema`); the file's size against the size the
header describes; only then the file read whole and its SHA-256; the header against the model
its ``arch`` and (bounded) ``model_kwargs`` build; and while decoding, every float finite and
every index inside its codebook or grid.  A refusal before the whole
file is read names the checksum when the file fails it (it is then damaged rather than
crafted), else the field.  No pickle anywhere: reading the file runs no code.
"""
import hashlib
import json
import os
import struct
import zlib

import numpy as np
import torch

from lib.export.bitpack import unpack_bits
from lib.export.schema import (MAGIC, MAX_HEADER_BYTES, MAX_HEADER_JSON,
                               check_fits_model, check_header, policy_layers, quant_options)
from lib.quantize.linear import n_steps
from lib.quantize.options import prepare_model
from lib.quantize.policy import apply_linear_policy
from lib.utils.checkpoint import with_module_versions
from lib.utils.errors import UserError

LENGTH = struct.Struct("<Q")
DIGEST = 32
FIXED = len(MAGIC) + LENGTH.size
_CHUNK = 1 << 20
# A refused file up to this size is hashed to tell damage (the checksum fails) from an edit
# (it passes: the field is named); a larger one is refused by its field without reading it.
HASH_ON_REFUSAL = 1 << 32


class _Bytes:
    """A packed file held in memory."""

    def __init__(self, data):
        self.data, self.size = data, len(data)

    def read(self, offset, n):
        return bytes(self.data[offset:offset + n])

    def digest_ok(self):
        return hashlib.sha256(self.data[:-DIGEST]).digest() == self.data[-DIGEST:]


class _File:
    """A packed file on disk, read in pieces until its size has been checked."""

    def __init__(self, handle):
        self.handle, self.size = handle, os.fstat(handle.fileno()).st_size

    def read(self, offset, n):
        self.handle.seek(offset)
        return self.handle.read(n)

    def digest_ok(self):
        """The checksum, hashed in 1 MiB pieces (a refused file is never held whole)."""
        sha, left = hashlib.sha256(), self.size - DIGEST
        self.handle.seek(0)
        while left > 0:
            piece = self.handle.read(min(_CHUNK, left))
            if not piece:
                return False
            sha.update(piece)
            left -= len(piece)
        return sha.digest() == self.read(self.size - DIGEST, DIGEST)


def _checksum_error(path):
    return UserError(f"'{path}' fails its SHA-256 checksum (truncated or altered); expected "
                     "the file exactly as python -m lib.export wrote it")


def _inflate(head, path):
    """The header's JSON text, decompressed to at most MAX_HEADER_JSON bytes."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(head, MAX_HEADER_JSON + 1)
    except zlib.error as exc:
        raise UserError(f"'{path}': the header is not zlib data ({exc}); expected a header "
                        "written by python -m lib.export") from None
    if len(text) > MAX_HEADER_JSON:
        raise UserError(f"'{path}': the header inflates to more than {MAX_HEADER_JSON:,} bytes; "
                        "expected a header of a few KB (one entry per tensor)")
    if not inflater.eof or inflater.unused_data:
        raise UserError(f"'{path}': the header's zlib stream is incomplete or followed by other "
                        "bytes; expected exactly one complete stream")
    return text


def _no_duplicates(pairs):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key '{key[:40]}' appears twice")
        seen.add(key)
    return dict(pairs)


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed (strict JSON)")


def _parse(text, path):
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"'{path}': the header is not valid UTF-8 JSON ({reason[:120]}); "
                        "expected a header written by python -m lib.export") from None


def _header_of(src, path):
    """The header of a file whose magic is right: length, inflation, schema, file size."""
    (head_len,) = LENGTH.unpack(src.read(len(MAGIC), LENGTH.size))
    room = src.size - FIXED - DIGEST
    if head_len > min(MAX_HEADER_BYTES, room):
        raise UserError(f"'{path}': the header claims {head_len:,} bytes; expected at most "
                        f"{min(MAX_HEADER_BYTES, room):,} (the file holds {src.size:,} bytes)")
    header = _parse(_inflate(src.read(FIXED, head_len), path), path)
    payload = check_header(header, path)
    expected = FIXED + head_len + payload + DIGEST
    if src.size != expected:
        raise UserError(f"'{path}' is {src.size:,} bytes but its header describes {expected:,} "
                        f"({payload:,} of payload); expected the complete file")
    header["payload_offset"] = FIXED + head_len
    header["file_bytes"] = src.size
    return header


def _checked_header(src, path):
    """The header of ``src``, refused if damaged (checksum) or ill-formed (the field)."""
    if src.size < FIXED + DIGEST or src.read(0, len(MAGIC)) != MAGIC:
        if src.read(0, len(MAGIC)) == MAGIC:
            raise UserError(f"'{path}' is truncated ({src.size} bytes); expected a complete "
                            "packed file written by python -m lib.export")
        raise UserError(f"'{path}' is not a packed HAQ model; expected a file written by "
                        "python -m lib.export")
    try:
        return _header_of(src, path)
    except UserError:
        if src.size <= HASH_ON_REFUSAL and not src.digest_ok():
            raise _checksum_error(path) from None
        raise


def read_header(data, path="<bytes>"):
    """Check a packed file's bytes (framing, header schema, size, checksum); return its header."""
    src = _Bytes(data)
    header = _checked_header(src, path)
    if not src.digest_ok():
        raise _checksum_error(path)
    return header


def _read_file(path):
    """``(bytes, header)`` of a packed file; read whole only once its size is the header's."""
    if not os.path.isfile(path):
        raise UserError(f"packed model '{path}' not found")
    try:
        with open(path, "rb") as handle:
            src = _File(handle)
            header = _checked_header(src, path)
            data = src.read(0, src.size)
    except OSError as exc:
        raise UserError(f"packed model '{path}' cannot be read ({exc.strerror or exc}); "
                        "expected a readable file") from None
    if len(data) != header["file_bytes"] or not _Bytes(data).digest_ok():
        raise _checksum_error(path)
    return data, header


def _model_of(header, path):
    """The model the header's arch and kwargs build.

    Built only after the schema has bounded the kwargs (num_classes, width_mult) to what the
    CLI's flags accept, so a crafted header cannot ask for a larger model than a user can.
    """
    from models import get_model
    try:
        model = get_model(header["arch"], linear=header["mode"] == "linear",
                          **header["model_kwargs"])
        if header["mode"] == "linear":   # the structure the options give (folded BN, biases)
            prepare_model(model, quant_options(header, path))
        return model
    except UserError as exc:
        raise UserError(f"'{path}': {exc}") from None


def _values(data, header, block, path, what):
    """A block as a tensor of its dtype; float32 blocks must be finite."""
    start = header["payload_offset"] + block["offset"]
    raw = data[start:start + block["nbytes"]]
    arr = np.frombuffer(raw, dtype={"float32": "<f4", "int64": "<i8"}[block["dtype"]])
    if block["dtype"] == "float32" and not np.isfinite(arr).all():
        raise UserError(f"'{path}': {what} holds NaN or infinite values; expected finite "
                        "float32 numbers")
    return torch.from_numpy(arr.copy())


def _codes(data, header, entry, path, most):
    """The entry's unpacked indices, each at most ``most``."""
    start = header["payload_offset"] + entry["indices"]["offset"]
    raw = data[start:start + entry["indices"]["nbytes"]]
    codes = torch.from_numpy(unpack_bits(raw, entry["bits"], entry["count"]))
    if codes.numel() and int(codes.max()) > most:
        raise UserError(f"'{path}': tensor '{entry['key']}' has an index {int(codes.max())}; "
                        f"expected indices in 0..{most}")
    return codes


def _decode(data, header, entry, path):
    what = f"tensor '{entry['key']}'"
    if entry["encoding"] == "float":
        return _values(data, header, entry, path, what).reshape(entry["shape"])
    if entry["encoding"] == "kmeans":
        codebook = _values(data, header, entry["codebook"], path, f"the codebook of {what}")
        values = codebook[_codes(data, header, entry, path, codebook.numel() - 1)]
    else:
        scale = _values(data, header, entry["scale"], path, f"the scale of {what}")
        if bool((scale < 0).any()):
            raise UserError(f"'{path}': the scale of {what} is {float(scale.min())}; "
                            "expected >= 0")
        steps = n_steps(entry["bits"], signed=True)
        codes = _codes(data, header, entry, path, 1 if steps == 0 else 2 * steps)
        q = (2 * codes - 1) if steps == 0 else (codes - steps)
        # one scale per layer or per output channel (rows of the weight)
        values = q.float().reshape(scale.numel(), -1) * scale.reshape(-1, 1)
    return values.reshape(entry["shape"])


def _contents(data, header, path):
    """``(model, state_dict)`` of checked bytes: the header against the model it describes,
    then every value."""
    model = _model_of(header, path)
    check_fits_model(header, model, path)
    return model, {e["key"]: _decode(data, header, e, path) for e in header["entries"]}


def unpack(data, path="<bytes>"):
    """``(state_dict, header)`` of a packed file's bytes, every field and value checked."""
    header = read_header(data, path)
    return _contents(data, header, path)[1], header


def read_packed(path):
    """``(state_dict, header)`` of a packed file, every field and value checked."""
    data, header = _read_file(path)
    return _contents(data, header, path)[1], header


def load_packed(path):
    """Rebuild the torch model a packed file describes; returns ``(model, header)`` (eval mode).

    Only the file is read: the architecture is built from ``arch``/``model_kwargs`` (linear
    mode: a Q twin, or the model with its layers swapped), every tensor is loaded strictly,
    the linear policy and half-wave flags are set as recorded.
    """
    data, header = _read_file(path)
    model, state = _contents(data, header, path)
    linear = header["mode"] == "linear"
    if linear:
        for name, module in policy_layers(model, "linear"):
            module.half_wave = header["half_wave"][name]
    own = model.state_dict()
    try:
        model.load_state_dict(with_module_versions(
            model, {k: v.to(own[k].dtype) for k, v in state.items()}), strict=True)
    except RuntimeError as exc:
        raise UserError(f"'{path}' does not fit arch '{header['arch']}' "
                        f"({str(exc).splitlines()[0]})") from None
    if linear:
        apply_linear_policy(model, header["policy"])
    return model.eval(), header
