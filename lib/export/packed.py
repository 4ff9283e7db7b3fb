"""The packed file of a fine-tuned policy (docs/design.md section 15): its layout, and the writer.

Layout (all integers little-endian)::

    8 bytes   magic  b"HAQPACK1"
    8 bytes   uint64 length H of the header
    H bytes   header: UTF-8 JSON (strict: no NaN/Infinity), zlib-compressed (RFC 1950)
    P bytes   payload: the blocks the header's entries point at (offsets from the payload
              start), back to back: each byte belongs to exactly one block
    32 bytes  SHA-256 of everything above

The header holds the architecture (``arch``, ``model_kwargs``), the ``mode`` and ``policy``,
the linear layers' ``half_wave`` flags, the linear ``quant_options`` when any is on (absent:
the released quantizer), and one entry per state_dict tensor, in state_dict order, with its
``key``, ``shape`` and ``encoding``:

* ``kmeans``: a K-Means layer's weight (HAQ's weight sharing, Han et al.'s Deep Compression):
  ``codebook`` = k <= 2^b float32 centroids (ascending), ``indices`` = one b-bit index per
  weight, bit-packed (:mod:`lib.export.bitpack`), so the weights take exactly
  ceil(n * b / 8) bytes;
* ``linear``: a linearly quantized weight: ``scale`` = one float32 (or one per output
  channel, row-major, with per-channel clips), ``indices`` = b-bit
  unsigned codes u = q + 2^(b-1) - 1 of the integers q = round(clamp(w, -t, t) / scale),
  scale = t / (2^(b-1) - 1), t = the layer's ``weight_range`` (docs/design.md section 4); the
  weight is q * scale.  One bit (b = 1) stores sign(w): the weight is (2u - 1) * t;
* ``float``: a raw little-endian array: IEEE-754 binary32 (``float32``) for every floating
  tensor (BN parameters and statistics, biases, ranges, layers the policy leaves float),
  ``int64`` for integer buffers (BN's ``num_batches_tracked``).

No pickle anywhere: reading the file runs no code.  The reader (:mod:`lib.export.reader`)
checks every header field against :mod:`lib.export.schema` and refuses, in one line
(:class:`lib.utils.errors.UserError`), a file whose checksum, length or any field is wrong.
"""
import hashlib
import json
import zlib

import torch

from lib.export.bitpack import pack_bits
from lib.export.reader import LENGTH, unpack
from lib.export.schema import (FORMAT_VERSION, MAGIC, float_weight_keys, part_sizes,
                               policy_layers, quantized_weights)
from lib.quantize.linear import n_steps
from lib.utils.checkpoint import atomic_write_bytes
from lib.utils.errors import UserError


class _Payload:
    """Appends blocks and records where each went."""

    def __init__(self):
        self.blocks, self.size = [], 0

    def add(self, data):
        block = {"offset": self.size, "nbytes": len(data)}
        self.blocks.append(data)
        self.size += len(data)
        return block


def _float_block(payload, tensor):
    t = tensor.detach().cpu()
    if t.is_floating_point():
        arr, dtype = t.float().numpy().astype("<f4"), "float32"
    else:
        arr, dtype = t.long().numpy().astype("<i8"), "int64"
    return dict(payload.add(arr.tobytes()), dtype=dtype)


def _kmeans_entry(payload, name, weight, bits):
    w = weight.detach().cpu().float().reshape(-1)
    codebook, idx = torch.unique(w, sorted=True, return_inverse=True)
    if codebook.numel() == 2 ** bits + 1 and bool((codebook == 0).any()):
        raise UserError(f"layer '{name}' holds 2^{bits} centroids plus pruned zeros; pruned "
                        "(--is_pruned) layers cannot be packed yet: expected an unpruned policy")
    if codebook.numel() > 2 ** bits:
        raise UserError(f"layer '{name}' holds {codebook.numel()} distinct weights, more than "
                        f"2^{bits}; expected a fully quantized K-Means checkpoint (after the last "
                        "epoch, when --free_high_bit layers are clustered)")
    return {"encoding": "kmeans", "bits": bits, "count": w.numel(),
            "codebook": dict(_float_block(payload, codebook), count=codebook.numel()),
            "indices": payload.add(pack_bits(idx.numpy(), bits))}


def _integer_codes(fq, t, steps):
    """Codes u = q + steps of fake-quantized weight rows ``fq`` [G, n] on the grid of the clips
    ``t`` [G, 1], and the float32 scales [G]; None when some row is not on its grid."""
    scale = (t / steps).float().double()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(fq / safe) * (scale > 0)
    if (q.abs() > steps).any() or ((q * scale - fq).abs() > 1e-6 * t).any():
        return None
    return (q.long() + steps).reshape(-1), scale.reshape(-1)


def _linear_codes(module, bits):
    """(codes, scales, clips) of a QConv2d/QLinear weight under its own fake quantization.

    One scale per layer, or per output channel when its ``weight_range`` holds one clip per
    channel.  The clip is the layer's ``weight_range`` (fixed at calibration).  Checkpoints of
    code that clipped at the current max|w| instead are recognised by their grid and packed
    with that clip, which the file then records as ``weight_range``.
    """
    groups = module.weight_range.numel()
    fq = module.quantized_weight().detach().cpu().double().reshape(groups, -1)
    steps = n_steps(bits, signed=True)
    top = fq.abs().amax(dim=1, keepdim=True)
    if steps == 0:      # 1 bit: t * sign(w)
        return (fq > 0).long().reshape(-1), top.reshape(-1), top.reshape(-1)
    candidates = [module.weight_range.detach().cpu().double().reshape(groups, 1), top]
    for t in candidates:
        codes = _integer_codes(fq, t, steps) if bool((t > 0).any()) else None
        if codes is not None:
            return codes[0], codes[1], t.reshape(-1)
    raise UserError("a linear layer's quantized weights are not integers times "
                    "weight_range / (2^(b-1) - 1); expected a fine-tuned linear-mode checkpoint")


def _linear_entry(payload, name, module, bits):
    codes, scales, clip = _linear_codes(module, bits)
    entry = {"encoding": "linear", "bits": bits, "count": codes.numel(),
             "scale": dict(_float_block(payload, scales), count=scales.numel()),
             "indices": payload.add(pack_bits(codes.numpy(), bits))}
    return entry, clip


def pack_model(model, arch, model_kwargs, mode, policy, layer_names=None, source=None,
               quant_options=None):
    """The packed file's bytes for ``model`` quantized by ``policy`` (see the module doc).

    ``model`` holds the fine-tuned weights (K-Means: already shared; linear: Q layers with
    the policy applied and ``weight_range`` calibrated).  ``quant_options``: the record of the
    linear quantizer options the model was prepared with (lib.quantize.options), stored in the
    header when any is on so the reader builds the same structure (folded BN, added biases,
    per-channel ranges).
    """
    model = model.cpu()
    quantized = quantized_weights(model, mode, policy)
    payload, entries, clips = _Payload(), [], {}
    for key, tensor in model.state_dict().items():
        if key in quantized:
            name, module, bits = quantized[key]
            if mode == "kmeans":
                entry = _kmeans_entry(payload, name, tensor, bits)
            else:
                entry, clip = _linear_entry(payload, name, module, bits)
                # weight is listed before its layer's weight_range buffer in state_dict order
                clips[f"{name}.weight_range" if name else "weight_range"] = clip
        else:
            if key in clips:
                tensor = clips[key].to(tensor.dtype).reshape(tensor.shape)
            entry = dict(_float_block(payload, tensor), encoding="float")
        entries.append(dict(entry, key=key, shape=list(tensor.shape)))
    sizes = part_sizes(entries, float_weight_keys(model, mode, quantized))
    header = {"format": "haq-packed", "version": FORMAT_VERSION, "arch": arch,
              "model_kwargs": model_kwargs, "mode": mode, "policy": list(policy),
              "layers": layer_names, "half_wave": _half_wave(model, mode), "source": source,
              "sizes": sizes, "entries": entries}
    if quant_options and any(v not in (False, "max") for v in quant_options.values()):
        header["quant_options"] = dict(quant_options)
    # the header names every tensor: compressed it is ~10x smaller (~5 KB for MobileNet-V2)
    head = zlib.compress(json.dumps(header, allow_nan=False).encode("utf-8"), 9)
    body = MAGIC + LENGTH.pack(len(head)) + head + b"".join(payload.blocks)
    return body + hashlib.sha256(body).digest()


def _half_wave(model, mode):
    if mode != "linear":
        return None
    return {n: bool(m.half_wave) for n, m in policy_layers(model, mode)}


def write_packed(path, model, arch, model_kwargs, mode, policy, layer_names=None, source=None,
                 quant_options=None):
    """Write the packed file atomically; returns its header (with the sizes).

    The bytes pass the reader's every check before anything is written, so a model the
    reader would refuse (a NaN weight, 10^6 classes) is refused here, and no file appears.
    """
    data = pack_model(model, arch, model_kwargs, mode, policy, layer_names, source,
                      quant_options)
    _, header = unpack(data, path)
    atomic_write_bytes(path, data)
    return header
