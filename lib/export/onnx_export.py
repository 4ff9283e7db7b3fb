"""ONNX export of a fine-tuned policy, checked in ONNX Runtime before it is written.

    python -m lib.export --format onnx --resume CKPT --output model.onnx

How (docs/design.md section 15 describes the packed file beside it):

1. the fine-tuned model is exported in floating point (``torch.onnx.export``, opset 21) with
   its fake quantization switched off and, in linear mode, each weight replaced by its own
   fake-quantized value, so the float graph computes the quantized model minus the input grids;
2. :mod:`lib.export.onnx_graph` rewrites that graph.  Linear mode: a layer's weight becomes
   integer codes q = round(clamp(w, -t, t) / s), s = t / (2^(b-1) - 1), t = ``weight_range``
   (one scale, or one per output channel when the range has one per channel), stored as int4
   (b <= 4), int8 (b <= 8) or int16, and DequantizeLinear computes q * s; a layer's input gets
   Clip to [0, r] (half-wave, s = r / (2^a - 1), uint8/uint16) or [-r, r] (full-wave,
   s = r / (2^(a-1) - 1), int8/int16), then QuantizeLinear and DequantizeLinear with zero point
   0: round(clip(x) / s) * s, the grid of :mod:`lib.quantize.linear`; the Clip keeps an a-bit
   grid inside its 8- or 16-bit type.  K-Means mode: a layer's weight becomes uint4 (<= 16
   centroids), uint8 or uint16 indices and its float codebook, gathered in the graph (Cast +
   Gather) rather than dequantized at load: the file keeps half a byte or a byte per weight
   instead of four, the gathered values are the checkpoint's bit for bit, and ONNX Runtime
   folds these constant nodes once when it loads the model, so inference runs the float graph;
3. the graph runs in ONNX Runtime on a batch beside the PyTorch fake-quant model; a file whose
   logits differ by more than :data:`LOGIT_TOL` times the largest |logit|, or whose top-1
   differs on any image, is refused and nothing is written.

The policy and the checkpoint's SHA-256 go into the model's ``metadata_props`` (``haq.*``).
"""
import copy
import logging
import math
import os

import torch

from lib.export.report import model_from_checkpoint
from lib.export.schema import policy_layers
from lib.quantize.linear import n_steps
from lib.utils.checkpoint import atomic_write_bytes, file_sha256, load_checkpoint
from lib.utils.errors import UserError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -r requirements-onnx.txt"
FORMAT = "haq-onnx"
FORMAT_VERSION = 1
# ONNX Runtime sums a layer's products in another order than PyTorch, so a sum may differ in
# its last bit; a sum that sits on a midpoint of the next layer's input grid (x / s = k + 1/2)
# then rounds to the other step, and the logits move by about one step of that grid (measured
# on the embedded model's 1,000 test images: 12 images at a policy with 4- to 8-bit inputs,
# top-1 unchanged; docs/results.md).  Every other image agrees to this fraction of the
# largest |logit|.  A tie hit by the check batch refuses a good file; another --seed writes it.
LOGIT_TOL = 1e-3
_COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


def require_onnx():
    """UserError in one line unless onnx, onnxruntime and onnxscript import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--format onnx needs onnx, onnxruntime and onnxscript ({exc.name} is "
                        f"missing); install them with '{INSTALL_HINT}'") from None


def layer_bits(module):
    """(w_bit, a_bit) of a QConv2d/QLinear: the one place this file reads bit widths."""
    return int(module.w_bit), int(module.a_bit)


def linear_weight_codes(name, module):
    """(integer codes, scales) of a Q layer's weight: the layer's own fake quantization, exactly.

    One scale, or one per output channel when ``weight_range`` holds one per channel.  A 1-bit
    weight (r * sign) is codes +-1 at scale r.
    """
    w_bit, _ = layer_bits(module)
    with torch.no_grad():
        fq = module.quantized_weight().detach().float().cpu()
        steps = max(n_steps(w_bit, signed=True), 1)
        scale = module.weight_range.detach().float().cpu().reshape(-1) / steps
        per_row = scale.reshape((-1,) + (1,) * (fq.dim() - 1))
        codes = torch.round(fq / per_row)
    if (codes.abs() > steps).any() or not torch.equal(codes * per_row, fq):
        raise UserError(f"layer '{name}': its quantized weights are not integers times "
                        "weight_range / (2^(b-1) - 1); expected a fine-tuned linear-mode "
                        "checkpoint")
    return codes.to(torch.int32).numpy(), scale.numpy()


def kmeans_weight_codes(name, weight, bits):
    """(indices shaped like the weight, ascending float32 codebook) of a shared weight."""
    w = weight.detach().float().cpu()
    codebook, idx = torch.unique(w.reshape(-1), sorted=True, return_inverse=True)
    if codebook.numel() > 2 ** bits:
        raise UserError(f"layer '{name}' holds {codebook.numel()} distinct weights, more than "
                        f"2^{bits}; expected a fully quantized K-Means checkpoint")
    return idx.reshape(w.shape).numpy(), codebook.numpy()


def float_twin(model, mode):
    """A copy computing the quantized model with no input grids, for torch.onnx.export: linear
    layers hold their fake-quantized weights and quantize nothing more."""
    twin = copy.deepcopy(model).cpu().eval()
    if mode == "linear":
        for _, m in policy_layers(twin, mode):
            with torch.no_grad():
                m.weight.copy_(m.quantized_weight())
            m.set_bits(-1, -1)
    return twin


def torch_to_onnx(model, input_size):
    """The float ONNX graph of ``model`` (batch dimension free), initializers by state_dict name.

    Not optimized: the exporter's optimizer folds BatchNorm into the weights, which would
    leave no weight initializer to quantize.
    """
    from lib.export.onnx_graph import OPSET
    x = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    chatty = logging.getLogger("onnx_ir")    # logs every pass at INFO
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        program = torch.onnx.export(model, (x,), dynamo=True, optimize=False,
                                    opset_version=OPSET, dynamic_shapes=({0: batch},),
                                    verbose=False)
    except Exception as exc:    # the exporter raises many kinds; the user needs its reason
        raise UserError(f"torch.onnx.export could not export the model ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}); expected a model torch.export "
                        "traces") from None
    return program.model_proto


def _compute_node(editor, name, key):
    """Index of the Conv/Gemm/MatMul node reading weight ``key`` (whose input 0 is the layer's)."""
    found = [k for k, node, i in editor.consumers(key)
             if node.op_type in _COMPUTE_OPS and i == 1]
    if len(found) != 1:
        raise UserError(f"layer '{name}': the exported graph has {len(found)} Conv/Gemm/MatMul "
                        f"nodes reading '{key}'; expected exactly one")
    return found[0]


def _quantize_input(editor, k, name, module, a_bit):
    from lib.export.onnx_graph import storage_type
    signed = not module.half_wave
    r = module.activation_range.detach().float().cpu().reshape(-1)[:1]
    steps = n_steps(a_bit, signed)
    if steps == 0:
        editor.sign_input(k, name, float(r))
        return
    scale = float((r / steps)[0])    # float32 division, as the fake quantization computes it
    lo = -float(r) if signed else 0.0
    editor.quantized_input(k, name, lo, float(r), scale,
                           storage_type(a_bit, signed, allow_int4=False))


def quantize_graph(proto, model, mode, policy_bits):
    """Rewrite the float graph ``proto`` into the quantized one (see the module doc).

    ``policy_bits``: {layer name: bits} (K-Means: weight bits or None).
    """
    from lib.export.onnx_graph import GraphEditor, storage_type
    editor = GraphEditor(proto)
    for name, module in policy_layers(model, mode):
        key = f"{name}.weight" if name else "weight"
        if key not in editor.inits:
            raise UserError(f"layer '{name}': the exported graph has no initializer '{key}'")
        if mode == "kmeans":
            if policy_bits[name] is not None:
                editor.gathered_weight(key, *kmeans_weight_codes(name, module.weight,
                                                                 policy_bits[name]))
            continue
        w_bit, a_bit = layer_bits(module)
        if a_bit > 0:     # found by the float weight's name, before the weight is rewired
            _quantize_input(editor, _compute_node(editor, name, key), name, module, a_bit)
        if w_bit > 0:
            codes, scale = linear_weight_codes(name, module)
            editor.dequantized_weight(key, codes, scale, storage_type(w_bit, signed=True))
    return editor.finish()


def ort_session(model_bytes):
    """An ONNX Runtime CPU session of the model, with as many threads as torch uses."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_session(session, x):
    """Logits of an ONNX Runtime session on a float tensor batch."""
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().float().cpu().numpy()})[0])


def compare(session, model, x):
    """(max |logit difference|, max |logit| of ``model``, #images whose top-1 differs)."""
    got = run_session(session, x)
    with torch.no_grad():
        want = model(x).float()
    return (float((got - want).abs().max()), float(want.abs().max()),
            int((got.argmax(1) != want.argmax(1)).sum()))


def check_agreement(model_bytes, model, x):
    """The check record; UserError when ONNX Runtime disagrees with ``model`` on batch ``x``."""
    diff, top, flips = compare(ort_session(model_bytes), model, x)
    tol = LOGIT_TOL * top
    if not diff <= tol or flips:
        raise UserError(f"ONNX Runtime disagrees with the PyTorch model on the check batch (max "
                        f"|logit difference| {diff:.3g}, tolerance {tol:.3g}; top-1 differs on "
                        f"{flips} of {x.shape[0]} images); expected agreement, nothing written")
    return {"images": int(x.shape[0]), "max_abs_logit_diff": diff, "max_abs_logit": top,
            "tolerance": tol}


def _finite(value):
    """JSON-safe: numbers that are not finite become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def policy_metadata(ckpt, model):
    """The policy as metadata: layer names, bits, mode, budget and cost (what the search wrote)."""
    policy = ckpt["policy"]
    names = policy.get("layers") or [n for n, _ in policy_layers(model, ckpt["mode"])]
    return {"mode": ckpt["mode"], "layers": list(names), "bits": policy["strategy"],
            "budget": _finite(policy.get("preserve_ratio")),
            "cost": {k: _finite(policy.get(k)) for k in ("metric", "hardware", "cost",
                                                         "cost_ratio")}}


def policy_bits(model, mode, strategy):
    """{layer name: weight bits, None = float} of a K-Means policy (linear: read from layers)."""
    from lib.quantize.policy import resolve_kmeans_policy
    if mode != "kmeans":
        return {}
    return {n: b for n, _, b in resolve_kmeans_policy(model, strategy)}


def build_onnx(model, ckpt, batch=8, seed=0):
    """(ONNX ModelProto of the quantized ``model``, check record), refusing a disagreeing one."""
    from lib.export.onnx_graph import set_metadata
    mode = ckpt["mode"]
    size = (ckpt.get("model_kwargs") or {}).get("input_size") or 224
    proto = quantize_graph(torch_to_onnx(float_twin(model, mode), size), model, mode,
                           policy_bits(model, mode, ckpt["policy"]["strategy"]))
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    check = check_agreement(proto.SerializeToString(), model, x)
    set_metadata(proto, {"format": FORMAT, "version": FORMAT_VERSION, "arch": ckpt["arch"],
                         "model_kwargs": ckpt.get("model_kwargs") or {},
                         "policy": policy_metadata(ckpt, model), "check": dict(check, seed=seed)})
    return proto, check


def export_onnx(path, output, batch=8, seed=0):
    """Write the checked ONNX model of finetune.py checkpoint ``path`` to ``output`` atomically;
    return its ``haq.*`` metadata."""
    require_onnx()
    from lib.export.onnx_graph import read_metadata, set_metadata
    ckpt = load_checkpoint(path)   # the one safe loader (weights_only=True)
    model = model_from_checkpoint(ckpt)
    proto, _ = build_onnx(model, ckpt, batch, seed)
    set_metadata(proto, {"source": {"file": os.path.basename(str(path)),
                                    "sha256": file_sha256(path)}})
    atomic_write_bytes(output, proto.SerializeToString())
    return read_metadata(proto)
