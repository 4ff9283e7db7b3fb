"""The packed file's header schema: what every field may hold, checked before a byte is decoded.

The SHA-256 at the end of a packed file proves only that it was not changed after it was
hashed, and anyone can re-hash an edited file.  So the reader trusts no field: each one is
checked for its JSON type and its range, the payload blocks must tile the payload exactly
(inside it, no overlap, no gap), every length must follow from the shape, dtype and width it
goes with, and the whole header must describe the model its ``arch`` and ``model_kwargs``
build (same tensors, same shapes, the policy's widths).  Every failure is a
:class:`lib.utils.errors.UserError` naming the file, the field and what was expected.

Unknown keys are ignored (nothing reads them), except in ``model_kwargs`` and ``sizes``,
where every key is used.
"""
import math

from lib.export.bitpack import MAX_BITS, packed_nbytes
from lib.quantize.options import QuantOptions
from lib.quantize.policy import resolve_kmeans_policy, resolve_linear_policy
from lib.utils.errors import UserError
from lib.utils.layers import quantizable_layers
from lib.utils.schema import INPUT_SIZES, MAX_CLASSES, MAX_WIDTH_MULT, is_int, is_str_list, shown

MAGIC = b"HAQPACK1"
FORMAT_VERSION = 1
PARTS = ("weights", "codebooks_scales", "float")
MAX_HEADER_BYTES = 1 << 24      # compressed; MobileNet-V2's header takes ~5 KB
MAX_HEADER_JSON = 1 << 25       # inflated: a header may not decompress to more than this
MAX_NDIM = 8
MAX_INT = 1 << 62               # offsets, lengths, element counts
DTYPES = {"float32": 4, "int64": 8}
_HEADER_KEYS = ("format", "version", "arch", "model_kwargs", "mode", "policy", "layers",
                "half_wave", "source", "sizes", "entries")
_SIDE = {"kmeans": "codebook", "linear": "scale"}


class Fields:
    """Type and range checks of one file's header fields; ``fail`` raises the one-line error."""

    def __init__(self, path):
        self.path = path

    def _field(self, where):
        return "the header" if where == "header" else f"header field '{where}'"

    def fail(self, where, value, expected):
        raise UserError(f"'{self.path}': {self._field(where)} is {shown(value)}; "
                        f"expected {expected}")

    def object(self, where, value, keys):
        """``value`` as a dict holding (at least) ``keys``."""
        if not isinstance(value, dict):
            self.fail(where, value, f"an object with keys {', '.join(keys)}")
        missing = [k for k in keys if k not in value]
        if missing:
            raise UserError(f"'{self.path}': {self._field(where)} lacks '{missing[0]}'; "
                            f"expected an object with keys {', '.join(keys)}")
        return value

    def integer(self, where, value, lo=0, hi=MAX_INT):
        if not is_int(value, lo, hi):
            self.fail(where, value, "a non-negative integer" if (lo, hi) == (0, MAX_INT)
                      else f"an integer in {lo}..{hi}")
        return value

    def string(self, where, value, optional=False):
        if not (isinstance(value, str) or (optional and value is None)):
            self.fail(where, value, "a string" + (" or null" if optional else ""))
        return value

    def choice(self, where, value, options):
        if not isinstance(value, str) or value not in options:
            self.fail(where, value, "one of " + ", ".join(repr(o) for o in options))
        return value

    def string_list(self, where, value):
        if not is_str_list(value):
            self.fail(where, value, "a list of strings")
        return value


def check_header(header, path):
    """Check every field that needs no model; return the payload's size in bytes.

    The payload size is what the blocks tile; the caller compares it with the file's size
    before reading the file whole.
    """
    f = Fields(path)
    f.object("header", header, _HEADER_KEYS)
    f.choice("format", header["format"], ("haq-packed",))
    if type(header["version"]) is not int or header["version"] != FORMAT_VERSION:
        f.fail("version", header["version"], f"{FORMAT_VERSION}, the format this reader knows")
    f.string("arch", header["arch"])
    _check_model_kwargs(f, header["model_kwargs"])
    mode = f.choice("mode", header["mode"], tuple(_SIDE))
    _check_policy(f, header["policy"], mode)
    if header["layers"] is not None:
        f.string_list("layers", header["layers"])
    _check_half_wave(f, header["half_wave"], mode)
    f.string("source", header["source"], optional=True)
    if "quant_options" in header:
        if mode != "linear":
            f.fail("quant_options", header["quant_options"], "no such field in kmeans mode")
        quant_options(header, path)
    sizes = header["sizes"]
    if not isinstance(sizes, dict) or set(sizes) != set(PARTS):
        f.fail("sizes", sizes, f"an object with exactly the keys {', '.join(PARTS)}")
    for part in PARTS:
        f.integer(f"sizes.{part}", sizes[part])
    entries = header["entries"]
    if not isinstance(entries, list) or not entries:
        f.fail("entries", entries, "a non-empty list of tensor entries")
    blocks = [b for i, e in enumerate(entries) for b in _check_entry(f, i, e, mode)]
    return _payload_size(f, blocks)


def _check_model_kwargs(f, kwargs):
    keys = ("num_classes", "input_size", "width_mult")
    f.object("model_kwargs", kwargs, keys[:2])     # width_mult may be left out: None
    extra = sorted(set(kwargs) - set(keys))
    if extra:
        f.fail(f"model_kwargs.{extra[0]}", kwargs[extra[0]],
               "no such key (model_kwargs holds num_classes, input_size, width_mult)")
    f.integer("model_kwargs.num_classes", kwargs["num_classes"], 1, MAX_CLASSES)
    f.integer("model_kwargs.input_size", kwargs["input_size"], *INPUT_SIZES)
    width = kwargs.get("width_mult")
    # NaN fails the comparison; an int past float's range compares exactly
    if width is not None and (type(width) not in (int, float)
                              or not 0 < width <= MAX_WIDTH_MULT):
        f.fail("model_kwargs.width_mult", width, f"null or a number in (0, {MAX_WIDTH_MULT:g}]")


def _bit_width(f, where, value, float_widths):
    if type(value) is not int or not (1 <= value <= MAX_BITS or value in float_widths):
        unquantized = " or ".join(str(w) for w in float_widths)
        f.fail(where, value,
               f"an integer bit width: {unquantized} (not quantized) or 1..{MAX_BITS}")


def _check_policy(f, policy, mode):
    if not isinstance(policy, list) or not policy:
        f.fail("policy", policy, "a non-empty list, one entry per quantizable layer")
    for i, entry in enumerate(policy):
        if mode == "kmeans":
            _bit_width(f, f"policy[{i}]", entry, (-1, 32))
            continue
        if not isinstance(entry, list) or len(entry) != 2:
            f.fail(f"policy[{i}]", entry, "a [w_bit, a_bit] pair")
        for j, bits in enumerate(entry):
            _bit_width(f, f"policy[{i}][{j}]", bits, (-1,))


def _check_half_wave(f, flags, mode):
    if mode == "kmeans":
        if flags is not None:
            f.fail("half_wave", flags, "null in kmeans mode")
        return
    if not isinstance(flags, dict):
        f.fail("half_wave", flags, "an object: layer name -> true/false")
    for name, flag in flags.items():
        if type(flag) is not bool:
            f.fail(f"half_wave.{name}", flag, "true or false")


def _block(f, where, value, dtype=None, count=None):
    """``(offset, nbytes, where)`` of a payload block; ``dtype``/``count`` checked if given."""
    keys = ("offset", "nbytes") + (("dtype",) if dtype else ()) + (("count",) if count else ())
    f.object(where, value, keys)
    offset = f.integer(f"{where}.offset", value["offset"])
    nbytes = f.integer(f"{where}.nbytes", value["nbytes"])
    if dtype:
        f.choice(f"{where}.dtype", value["dtype"], dtype)
    if count:
        f.integer(f"{where}.count", value["count"], *count)
    return offset, nbytes, where


def _length(f, where, nbytes, expected, why):
    if nbytes != expected:
        f.fail(where, nbytes, f"{expected} ({why})")


def _check_entry(f, i, entry, mode):
    """The payload blocks of entry ``i``, its lengths checked against its shape and width."""
    where = f"entries[{i}]"
    f.object(where, entry, ("key", "shape", "encoding"))
    f.string(f"{where}.key", entry["key"])
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        f.fail(f"{where}.shape", shape, f"a list of at most {MAX_NDIM} sizes")
    count = math.prod(f.integer(f"{where}.shape[{d}]", n) for d, n in enumerate(shape))
    encoding = f.choice(f"{where}.encoding", entry["encoding"], ("float", mode))
    if encoding == "float":
        block = _block(f, where, entry, dtype=tuple(DTYPES))
        _length(f, f"{where}.nbytes", block[1], count * DTYPES[entry["dtype"]],
                f"{count} elements of {entry['dtype']}")
        return [block]
    side = _SIDE[mode]
    f.object(where, entry, ("bits", "count", side, "indices"))
    bits = f.integer(f"{where}.bits", entry["bits"], 1, MAX_BITS)
    _length(f, f"{where}.count", entry["count"], count, f"the number of elements of {shape}")
    # linear: one scale, or one per output channel
    most = 2 ** bits if mode == "kmeans" else max(1, shape[0] if shape else 1)
    side_block = _block(f, f"{where}.{side}", entry[side], ("float32",), (1, most))
    if mode == "linear" and entry[side]["count"] not in (1, most):
        f.fail(f"{where}.{side}.count", entry[side]["count"],
               f"1 or {most} (one scale per layer or per output channel)")
    _length(f, f"{where}.{side}.nbytes", side_block[1], 4 * entry[side]["count"],
            "4 bytes per float32")
    indices = _block(f, f"{where}.indices", entry["indices"])
    _length(f, f"{where}.indices.nbytes", indices[1], packed_nbytes(count, bits),
            f"{count} values of {bits} bits, bit-packed")
    return [side_block, indices]


def _payload_size(f, blocks):
    """The payload's length; the blocks must cover it exactly once (no overlap, no gap)."""
    end = 0
    for offset, nbytes, where in sorted(blocks, key=lambda b: (b[0], b[1])):
        if offset != end:
            f.fail(f"{where}.offset", offset, f"{end}, where the previous block ends (the "
                   "blocks follow each other without gaps or overlaps)")
        end += nbytes
    return end


def quant_options(header, path):
    """The header's linear quantizer options (absent: the released quantizer's)."""
    try:
        return QuantOptions.from_record(header.get("quant_options"))
    except UserError as exc:
        raise UserError(f"'{path}': header field {exc}") from None


# ------------------------------------------------------------------------ against the model
def policy_layers(model, mode):
    """``[(name, module)]`` of the layers the policy of ``mode`` gives bits to."""
    return quantizable_layers(model, linear=mode == "linear")


def quantized_weights(model, mode, policy):
    """{weight key: (layer name, module, bits)} of the layers the policy quantizes."""
    if mode == "kmeans":
        plan = [(n, m, b) for n, m, b in resolve_kmeans_policy(model, policy) if b is not None]
    else:
        plan = [(n, m, w) for n, m, w, _ in resolve_linear_policy(model, policy) if w > 0]
    return {f"{n}.weight" if n else "weight": (n, m, b) for n, m, b in plan}


def float_weight_keys(model, mode, quantized):
    """Weight keys of the policy's layers that it leaves float (counted as weights)."""
    return {f"{n}.weight" for n, _ in policy_layers(model, mode)} - set(quantized)


def part_sizes(entries, float_weights):
    """{part: bytes} of the entries: the packed weights, their codebooks or scales, the rest."""
    sizes = dict.fromkeys(PARTS, 0)
    for e in entries:
        if e["encoding"] == "float":
            sizes["weights" if e["key"] in float_weights else "float"] += e["nbytes"]
        else:
            sizes["weights"] += e["indices"]["nbytes"]
            sizes["codebooks_scales"] += e[_SIDE[e["encoding"]]]["nbytes"]
    return sizes


def check_fits_model(header, model, path):
    """The header describes ``model`` (built from its arch and kwargs): the
    same tensors with the same shapes and dtypes, each policy layer at the policy's width,
    the half-wave flags of its layers, and the sizes its entries add up to."""
    f, mode = Fields(path), header["mode"]
    try:
        quantized = quantized_weights(model, mode, header["policy"])
    except UserError as exc:
        raise UserError(f"'{path}': header field 'policy' does not fit arch "
                        f"'{header['arch']}': {exc}") from None
    state = model.state_dict()
    keys = [e["key"] for e in header["entries"]]
    _check_keys(f, keys, list(state))
    for i, entry in enumerate(header["entries"]):
        _check_fit(f, f"entries[{i}]", entry, state[entry["key"]], quantized, mode)
    if mode == "linear":
        names = [n for n, _ in policy_layers(model, mode)]
        if set(header["half_wave"]) != set(names):
            f.fail("half_wave", header["half_wave"], f"one flag for each of the {len(names)} "
                   f"QConv2d/QLinear layers of arch '{header['arch']}'")
    expected = part_sizes(header["entries"], float_weight_keys(model, mode, quantized))
    if header["sizes"] != expected:
        f.fail("sizes", header["sizes"], f"{expected}, the sums of the entries' lengths")


def _check_keys(f, keys, wanted):
    seen = set()
    for key in keys:
        if key in seen:
            f.fail("entries", key, "each state_dict key once (this one comes twice)")
        seen.add(key)
    if set(keys) != set(wanted):
        odd = sorted(set(keys) - set(wanted)) or sorted(set(wanted) - set(keys))
        f.fail("entries", odd[:3], f"the {len(wanted)} state_dict keys of the model that arch "
               "and model_kwargs build (these are unexpected or missing)")


def _check_fit(f, where, entry, tensor, quantized, mode):
    if entry["shape"] != list(tensor.shape):
        f.fail(f"{where}.shape", entry["shape"], f"{list(tensor.shape)}, the shape of "
               f"'{entry['key']}' in the model")
    if entry["key"] in quantized:
        bits = quantized[entry["key"]][2]
        if entry["encoding"] != mode or entry["bits"] != bits:
            f.fail(f"{where}.encoding", entry["encoding"], f"'{mode}' at {bits} bits, as "
                   "the policy quantizes this weight")
        return
    if entry["encoding"] != "float":
        f.fail(f"{where}.encoding", entry["encoding"], "'float' (the policy leaves "
               f"'{entry['key']}' unquantized)")
    dtype = "float32" if tensor.is_floating_point() else "int64"
    if entry["dtype"] != dtype:
        f.fail(f"{where}.dtype", entry["dtype"], f"'{dtype}' for '{entry['key']}'")
