"""Linear-mode quantizer options beside the released defaults (issue 34; docs/results.md).

Each is off by default, so the released quantizer (one max|w| clip per layer, BatchNorm
after the quantized conv, float biases as trained) is what runs unless asked otherwise:

* ``per_channel``: one symmetric clip per output channel; ``weight_range`` becomes
  ``[C, 1, 1, 1]`` (conv) or ``[C, 1]`` (linear) and broadcasts in the fake quantization;
* ``weight_clip``: ``"max"`` (t = max|w|) or ``"mse"``: t = argmin_t ||Q(w; t) - w||^2 over
  the grid t = max|w| * k / N, k = 1..N, chosen per layer and width (per channel too);
* ``fold_bn``: every BatchNorm that follows a conv is folded into it before weight
  quantization, W' = W * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta (Jacob et
  al. 2018, eq. 8 without the fake quantization), and becomes an identity;
* ``bias_correction``: after calibration each quantized layer's bias absorbs the mean output
  shift on the calibration batch, b += E[W x] - E[Q(W) x] (Nagel et al. 2019, section 4.2,
  measured empirically); layers without a bias get one;
* ``bn_reestimate``: after calibration every BatchNorm's running statistics are measured
  again on that many training images with the quantized model
  (:func:`reestimate_batchnorm`); 0 (off) keeps the pretrained statistics.

``prepare_model`` gives a model the structure and the per-layer settings these imply; it is
applied to the float model before any checkpoint of the prepared model is loaded into it,
so the state_dict keys and shapes match (a model prepared with all options off is
untouched, and old checkpoints load as before).
"""
import logging
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.quantize.linear import fake_quantize, kl_clip, quant_layers
from lib.utils.cli import INT_MAX
from lib.utils.errors import UserError
from lib.utils.layers import fold_batchnorm as folded_copy

logger = logging.getLogger(__name__)

WEIGHT_CLIPS = ("max", "mse")
MAX_BN_IMAGES = INT_MAX      # a C int, as the --bn_reestimate flag caps it
MSE_GRID = 100              # candidate clips max|w| * k / MSE_GRID, k = 1..MSE_GRID
_CHUNK_ELEMENTS = 1 << 22   # candidates x weights evaluated at once (32 MB of float64)


@dataclass(frozen=True)
class QuantOptions:
    """The linear-mode quantizer options; all off = the released quantizer."""
    per_channel: bool = False
    weight_clip: str = "max"
    fold_bn: bool = False
    bias_correction: bool = False
    bn_reestimate: int = 0      # training images; 0 = off

    def is_default(self):
        return self == QuantOptions()

    def changes_layers(self):
        """Whether an option sets the Q layers' calibration or structure (BatchNorm
        re-estimation runs after calibration and changes neither)."""
        return replace(self, bn_reestimate=0) != QuantOptions()

    def record(self):
        """The strategy.json / packed-header record: a JSON object of the fields."""
        return asdict(self)

    @classmethod
    def from_record(cls, record, where="quant_options"):
        """The options of a record (None or missing keys: the defaults); UserError if malformed."""
        record = record or {}
        if not isinstance(record, dict):
            raise UserError(f"{where} is {type(record).__name__}; expected an object with keys "
                            + ", ".join(f.name for f in fields(cls)))
        unknown = sorted(set(record) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"{where} has the unknown key '{unknown[0]}'; expected only "
                            + ", ".join(f.name for f in fields(cls)))
        for name in ("per_channel", "fold_bn", "bias_correction"):
            if not isinstance(record.get(name, False), bool):
                raise UserError(f"{where}.{name} is {record[name]!r}; expected true or false")
        if record.get("weight_clip", "max") not in WEIGHT_CLIPS:
            raise UserError(f"{where}.weight_clip is {record['weight_clip']!r}; expected one of "
                            + ", ".join(WEIGHT_CLIPS))
        n = record.get("bn_reestimate", 0)   # records older than the option lack it: off
        if type(n) is not int or not 0 <= n <= MAX_BN_IMAGES:
            raise UserError(f"{where}.bn_reestimate is {n!r}; expected an integer in "
                            f"[0, {MAX_BN_IMAGES}] (training images)")
        return cls(**record)

    @classmethod
    def from_args(cls, args):
        """The options of parsed flags (``per_channel``, ``weight_clip``, ...; None = off)."""
        return cls(per_channel=bool(getattr(args, "per_channel", False)),
                   weight_clip=getattr(args, "weight_clip", None) or "max",
                   fold_bn=bool(getattr(args, "fold_bn", False)),
                   bias_correction=bool(getattr(args, "bias_correction", False)),
                   bn_reestimate=getattr(args, "bn_reestimate", None) or 0)


LINEAR_ONLY = ("--per_channel, --weight_clip mse, --fold_bn, --bias_correction and --bn_reestimate "
               "are linear-quantizer options")


def add_flags(parser, default):
    """The option flags (``default`` False for a search; None in the fine-tune, where
    unset means the strategy's record)."""
    from lib.utils import cli
    cli.bool_flag(parser, "--per_channel", default, FLAG_HELP["per_channel"])
    parser.add_argument("--weight_clip", default=None if default is None else "max",
                        choices=WEIGHT_CLIPS, help=FLAG_HELP["weight_clip"])
    cli.bool_flag(parser, "--fold_bn", default, FLAG_HELP["fold_bn"])
    cli.bool_flag(parser, "--bias_correction", default, FLAG_HELP["bias_correction"])
    parser.add_argument("--bn_reestimate", default=None if default is None else 0,
                        type=cli.number(int, 0, MAX_BN_IMAGES), metavar="N",
                        help=FLAG_HELP["bn_reestimate"])


def resolve(args, record, where):
    """The options of a fine-tune: the strategy's ``record``, each overridden by its flag when
    given (None: unset)."""
    options = QuantOptions.from_record(record, where).record()
    for name in options:
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return QuantOptions(**options)


FLAG_HELP = {
    "per_channel": "linear: one symmetric weight clip per output channel (default: one per layer, "
                   "as released)",
    "weight_clip": "linear: the weight clip above --kl_max_bit: max = max|w| (released), mse = the "
                   "clip on a 100-step grid that minimises the squared quantization error, per "
                   "layer and width",
    "fold_bn": "linear: fold each BatchNorm into the conv before it before quantizing its weights",
    "bias_correction": "linear: correct each quantized layer's bias by its mean output shift on "
                       "the calibration batch",
    "bn_reestimate": "linear: after calibration, measure every BatchNorm's running statistics "
                     "again with the quantized model on the first N training images (whole "
                     "batches); 0 = keep the pretrained ones (as released)",
}


# ------------------------------------------------------------------ clips
def _channel_view(weight, per_channel):
    """``weight`` as [groups, n]: one row per output channel, or a single row."""
    w = weight.detach()
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def mse_clip(weight, bits, per_channel=False, grid=MSE_GRID):
    """The clip t = max|w| * k / grid, k in 1..grid, minimising ||Q(w; t) - w||^2.

    Per output channel when ``per_channel`` (shape [C]), else one for the tensor (shape [1]).
    The first minimiser wins a tie; an all-zero row gets 0.  Vectorised over candidates in
    chunks of at most ``_CHUNK_ELEMENTS`` values.
    """
    w = _channel_view(weight, per_channel).double()
    top = w.abs().amax(dim=1)                                    # [G]
    ks = torch.arange(1, grid + 1, dtype=w.dtype, device=w.device) / grid
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, w.numel()))
    errors = []
    for start in range(0, grid, per_chunk):
        t = top[None, :, None] * ks[start:start + per_chunk, None, None]   # [K, G, 1]
        errors.append((fake_quantize(w[None], t, bits, signed=True) - w[None]).pow(2).sum(dim=2))
    best = torch.cat(errors).argmin(dim=0)                       # [G]
    return (top * ks[best]).to(weight.dtype)


def weight_clip(module, bits):
    """The clip of ``module``'s weight at ``bits`` under its options (shape [1] or [C]).

    Widths of at most the layer's ``kl_max_bit`` keep the released divergence clip
    (:func:`lib.quantize.linear.kl_clip`), per channel when ``per_channel``.
    """
    rows = _channel_view(module.weight, module.per_channel)
    if 0 < bits <= module.kl_max_bit:
        return torch.tensor([kl_clip(row, bits) for row in rows], dtype=rows.dtype,
                            device=rows.device)
    if module.weight_clip == "mse":
        return mse_clip(module.weight, bits, module.per_channel)
    return rows.abs().amax(dim=1)


@torch.no_grad()
def calibrate_weight_with_options(module):
    """Calibration of a layer with options: its clip(s) by :func:`weight_clip`, and with bias
    correction the shift its bias takes once the calibration pass is over (``_bias_shift``)."""
    bits = module.w_bit
    r = module.weight_range
    if bits > 0:
        r.copy_(weight_clip(module, bits).reshape(r.shape))
    else:   # not quantized: the released max|w| (a range the layer does not use)
        r.copy_(_channel_view(module.weight, module.per_channel).abs().amax(dim=1).reshape(r.shape))
    x = getattr(module, "_calibration_input", None)
    if module.bias_correction and bits > 0 and x is not None:
        module._bias_shift = output_shift(module, x)


# ------------------------------------------------------------------ structure
def _range_shape(module):
    return (module.weight.shape[0],) + (1,) * (module.weight.dim() - 1)


@torch.no_grad()
def set_per_channel(module):
    """Give ``module`` a ``weight_range`` of one clip per output channel ([C,1,1,1] / [C,1])."""
    module.per_channel = True
    r = module.weight_range
    shape = _range_shape(module)
    if tuple(r.shape) != shape:
        module.weight_range = torch.full(shape, -1.0, device=r.device, dtype=r.dtype)


def add_bias(module):
    """A zero bias for a layer without one (what bias correction and folding adjust)."""
    if module.bias is None:
        w = module.weight
        module.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))


@torch.no_grad()
def fold_batchnorm(model):
    """Fold every conv -> BatchNorm2d pair of ``model`` in place; returns the pairs' names.

    The maths and the pairing are lib.utils.layers.fold_batchnorm's (a BatchNorm2d registered
    right after a Conv2d of as many channels): the conv takes W * g / sqrt(v + eps) and bias
    (b - m) * g / sqrt(v + eps) + beta from the BN's running statistics, here as trainable
    Parameters, and the BN becomes an ``nn.Identity``; in eval mode the output is the
    conv+BN one up to float rounding.  Call it while every layer is float (bits -1).
    """
    scales = {}
    folded = folded_copy(model, scales)
    names = {m: n for n, m in folded.named_modules()}
    pairs = []
    for conv in scales:
        name = names[conv]
        target = model.get_submodule(name)
        target.weight.copy_(conv.weight)
        target.bias = nn.Parameter(conv.bias.detach().clone().to(target.weight.dtype))
    for name, module in folded.named_modules():
        if isinstance(module, nn.Identity) and isinstance(model.get_submodule(name),
                                                          nn.BatchNorm2d):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child,
                    nn.Identity())
            pairs.append(name)
    logger.info("folded %d BatchNorm layers into the convs before them", len(pairs))
    return pairs


def prepare_model(model, options):
    """Give a linear-mode model the structure and per-layer settings of ``options``, in place.

    Apply it to the float model right after its pretrained weights are loaded (folding uses
    them), or before loading a checkpoint of a model prepared the same way (the keys and
    shapes then match).  All options off: the model is untouched.
    """
    if options.fold_bn:
        fold_batchnorm(model)
    for m in quant_layers(model):
        m.weight_clip = options.weight_clip
        m.bias_correction = options.bias_correction
        if options.changes_layers():
            m.weight_calibrator = calibrate_weight_with_options
        if options.per_channel:
            set_per_channel(m)
        if options.bias_correction:
            add_bias(m)
    return model


# ------------------------------------------------------------------ bias correction
def _layer_output(module, x, weight):
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, None)
    return F.linear(x, weight)


@torch.no_grad()
def output_shift(module, x):
    """E[W x] - E[Q(W) x] per output channel, the mean over every other output dimension.

    ``x``: the layer's input on the calibration batch; Q(W) on the layer's current range.
    """
    calibrating, module.calibrating = module.calibrating, False
    try:
        diff = module.weight - module.quantized_weight()
    finally:
        module.calibrating = calibrating
    out = _layer_output(module, x, diff)
    dims = [d for d in range(out.dim()) if d != 1]
    return out.mean(dim=dims)


def needs_weight_recalibration(module):
    """Whether a change of ``module``'s weight width changes what calibration sets for it."""
    return module.weight_clip == "mse" or module.bias_correction


# ------------------------------------------------------------------ BatchNorm re-estimation
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _batches(loader, n_images):
    """The input tensors of ``loader``'s first whole batches holding at least ``n_images``."""
    seen = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        yield x
        seen += x.shape[0]
        if seen >= n_images:
            return


@torch.no_grad()
def reestimate_batchnorm(model, loader, n_images, device=None):
    """Measure every BatchNorm's running mean and variance again, with the quantized model.

    The BatchNorm statistics were learnt on the float model's activations. Quantizing (and
    clipping) the weights moves each layer's output distribution, so those means and
    variances no longer centre and scale what the BatchNorms now receive; measuring them anew
    on a few training images with the quantization in place is a known post-training fix
    (BatchNorm re-estimation, e.g. Nagel et al. 2021, "A White Paper on Neural Network
    Quantization").  Here every BatchNorm's statistics are reset and measured as a cumulative
    average over the first whole batches of ``loader`` holding at least ``n_images`` images
    (one batch at least): mean = (1/K) sum_k E_k[x], var = (1/K) sum_k Var_k[x] (unbiased), over
    the K batches, with the BatchNorms in training mode (each normalises by its batch, as in
    training) and every other module in eval mode (fixed quantization ranges, no dropout); no
    gradients, no parameter changes.  Each module's mode and each BatchNorm's momentum are
    restored.  Returns the number of images used (0 when the model has no BatchNorm that
    tracks statistics, e.g. after --fold_bn, or ``n_images`` is 0: a no-op).
    """
    bns = [m for m in model.modules() if isinstance(m, _BATCHNORMS) and m.track_running_stats]
    if not bns or n_images <= 0:
        logger.debug("BatchNorm re-estimation skipped: %s",
                     "no BatchNorm layers" if not bns else "0 images")
        return 0
    if device is None:
        device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    kept = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None   # cumulative average over the batches
        bn.train()
    seen = 0
    try:
        for x in _batches(loader, n_images):
            model(x.to(device))
            seen += x.shape[0]
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, training in modes.items():
            m.training = training
    if seen == 0:   # an empty loader: the statistics as they were
        for bn, state in zip(bns, kept):
            bn.load_state_dict(state)
        logger.warning("BatchNorm re-estimation skipped: the training loader gave no images")
        return 0
    logger.info("re-estimated %d BatchNorm layers' statistics on %d training images",
                len(bns), seen)
    return seen


__all__ = ["QuantOptions", "add_flags", "resolve", "WEIGHT_CLIPS", "MSE_GRID", "FLAG_HELP", "mse_clip", "weight_clip",
           "fold_batchnorm", "prepare_model", "output_shift", "add_bias",
           "set_per_channel", "needs_weight_recalibration", "calibrate_weight_with_options",
           "reestimate_batchnorm", "MAX_BN_IMAGES", "LINEAR_ONLY"]
