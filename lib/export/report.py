"""From a finetune.py checkpoint to a packed file, and the file's size against the prediction.

The prediction for the weights is the simulator's size cost of the policy
(:class:`lib.simulator.SizeCost`: sum(bits_i * #weights_i), a float layer at 32 bits), the
quantity the K-Means search budgets.  The other parts have no simulator counterpart; their
expected sizes are counted from the model: a codebook of 2^b float32 centroids per K-Means
layer, one float32 scale per linear layer (per output channel with --per_channel), 4 bytes per
float element elsewhere.
"""
from lib.export.packed import write_packed
from lib.export.schema import PARTS
from lib.quantize.options import QuantOptions, prepare_model
from lib.quantize.policy import apply_linear_policy
from lib.simulator import SizeCost
from lib.utils.checkpoint import extract_state_dict, load_checkpoint, with_module_versions
from lib.utils.errors import UserError
from lib.utils.layers import quantizable_layers

FLOAT_BIT = 32


def model_from_checkpoint(ckpt):
    """The fine-tuned model of a finetune.py checkpoint (dict), with its policy applied."""
    from models import get_model
    if not isinstance(ckpt, dict) or "policy" not in ckpt or "mode" not in ckpt:
        raise UserError("the checkpoint records no policy; expected a checkpoint written by "
                        "finetune.py")
    linear = ckpt["mode"] == "linear"
    model = get_model(ckpt["arch"], linear=linear, **ckpt["model_kwargs"])
    options = checkpoint_options(ckpt)
    if linear:   # the structure the fine-tune gave it (folded BN, added biases)
        prepare_model(model, options)
    try:
        model.load_state_dict(with_module_versions(model, extract_state_dict(ckpt)), strict=True)
    except RuntimeError as exc:
        raise UserError(f"the checkpoint's weights do not fit arch '{ckpt['arch']}' "
                        f"({str(exc).splitlines()[0]})") from None
    if linear:
        apply_linear_policy(model, ckpt["policy"]["strategy"])
    return model.eval()


def export_checkpoint(path, output):
    """Write the packed file of finetune.py checkpoint ``path`` to ``output``; return its header."""
    ckpt = load_checkpoint(path)   # the one safe loader (weights_only=True)
    model = model_from_checkpoint(ckpt)
    policy = ckpt["policy"]
    return write_packed(output, model, ckpt["arch"], ckpt["model_kwargs"], ckpt["mode"],
                        policy["strategy"], policy.get("layers"), source=str(path),
                        quant_options=checkpoint_options(ckpt).record())


def checkpoint_options(ckpt):
    """The linear quantizer options a finetune.py checkpoint's policy records (none: defaults)."""
    try:
        return QuantOptions.from_record(ckpt["policy"].get("quant_options"),
                                        "the checkpoint's policy field quant_options")
    except UserError as exc:
        raise UserError(f"{exc}; expected a checkpoint written by finetune.py") from None


def _weight_bits(mode, entry):
    bits = entry[0] if mode == "linear" else entry
    return FLOAT_BIT if bits in (-1, 32) else int(bits)


def predicted_sizes(header):
    """{part: expected bytes}; 'weights' is the simulator's size cost of the policy."""
    from models import get_model
    mode, policy = header["mode"], header["policy"]
    model = get_model(header["arch"], linear=mode == "linear", **header["model_kwargs"])
    options = QuantOptions.from_record(header.get("quant_options"))
    if mode == "linear":
        prepare_model(model, options)
    layers = quantizable_layers(model, linear=mode == "linear")
    bits = [_weight_bits(mode, e) for e in policy]
    weights_bits = SizeCost([m.weight.numel() for _, m in layers], FLOAT_BIT)(bits)
    scales = [m.weight.shape[0] if options.per_channel else 1 for _, m in layers]
    side = sum((2 ** b if mode == "kmeans" else n) * 4
               for b, n in zip(bits, scales) if b != FLOAT_BIT)
    weight_keys = {f"{n}.weight" for n, _ in layers}
    floats = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                 if k not in weight_keys)
    return {"weights": weights_bits / 8, "codebooks_scales": side, "float": floats}


def size_report(header):
    """Lines: each part's bytes in the file against the prediction, and the whole file."""
    pred = predicted_sizes(header)
    sizes = header["sizes"]
    lines = [f"{header['arch']} ({header['mode']}), {len(header['policy'])} layers",
             f"{'part':<18}{'file bytes':>14}{'predicted':>14}{'file/pred':>11}"]
    for part in PARTS:
        ratio = sizes[part] / pred[part] if pred[part] else float("nan")
        lines.append(f"{part:<18}{sizes[part]:>14,d}{pred[part]:>14,.0f}{ratio:>11.5f}")
    other = header["file_bytes"] - sum(sizes.values())
    lines.append(f"{'header+checksum':<18}{other:>14,d}")
    lines.append(f"{'whole file':<18}{header['file_bytes']:>14,d}"
                 f"{sum(pred.values()):>14,.0f}   ({header['file_bytes'] / 2 ** 20:.3f} MB)")
    return lines
