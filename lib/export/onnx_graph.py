"""Rewriting an exported float ONNX graph into HAQ's quantized one (the ``onnx`` helper API).

The float graph comes from ``torch.onnx.export`` of the fine-tuned model with its fake
quantization switched off; its weight initializers keep their state_dict names
(``<layer>.weight``, the layer's ``named_modules()`` name).  This module then

* replaces a linear layer's weight by integer codes q and a scale s feeding a DequantizeLinear
  (weight = q * s, the grid of :mod:`lib.quantize.linear`);
* replaces a K-Means layer's weight by uint8/uint16 indices and a float codebook feeding a
  Gather (weight = codebook[indices]);
* puts Clip -> QuantizeLinear -> DequantizeLinear in front of a layer's input.

Only the standard ONNX domain is used (opset 21: int4 initializers, 16-bit QuantizeLinear).
"""
import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
METADATA_PREFIX = "haq."

_SIGNED = {4: TensorProto.INT4, 8: TensorProto.INT8, 16: TensorProto.INT16}
_UNSIGNED = {8: TensorProto.UINT8, 16: TensorProto.UINT16}


def storage_type(bits, signed, allow_int4=True):
    """The narrowest ONNX integer type of a ``bits``-bit code; int4 only if ``allow_int4``."""
    table = _SIGNED if signed else _UNSIGNED
    for width, dtype in sorted(table.items()):
        if bits <= width and (allow_int4 or width > 4):
            return dtype
    raise ValueError(f"no ONNX storage for {bits}-bit codes")


def _int_tensor(name, values, dtype):
    """An initializer of integer ``values`` stored as ``dtype`` (int4 packed two to a byte)."""
    values = np.asarray(values)
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, dtype, values.shape, _pack_int4(values), raw=True)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    return numpy_helper.from_array(values.astype(np_dtype), name)


def _pack_int4(values):
    """Nibbles (two's complement for int4), two to a byte, the first in the low nibble (ONNX's
    int4/uint4 layout)."""
    nibbles = (values.reshape(-1).astype(np.int64) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def _float_tensor(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


class GraphEditor:
    """Edits of one graph: new initializers/nodes, rewired inputs, then :meth:`finish`."""

    def __init__(self, model):
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.prefix_nodes = []       # nodes fed by initializers only: they go first
        self.before = {}             # node index -> nodes to place right before it
        self.used = (set(self.inits) | {i.name for i in self.graph.input}
                     | {n for node in self.graph.node for n in node.output})

    def fresh(self, base):
        """A tensor name not used yet in the graph."""
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def consumers(self, tensor):
        """[(node index, node, input index)] of every node reading ``tensor``."""
        return [(k, node, i) for k, node in enumerate(self.graph.node)
                for i, n in enumerate(node.input) if n == tensor]

    def _replace_initializer(self, name, nodes, new_inits, output):
        """Readers of initializer ``name`` read ``output``, which ``nodes`` (first in the graph)
        compute; :meth:`finish` drops the unread initializer."""
        if name not in self.inits:
            raise KeyError(name)
        self.graph.initializer.extend(new_inits)
        self.prefix_nodes.extend(nodes)
        for _, node, i in self.consumers(name):
            node.input[i] = output

    def dequantized_weight(self, name, codes, scale, dtype):
        """Weight ``name`` := DequantizeLinear(codes, scale): per tensor for one scale, else
        per output channel (axis 0)."""
        scale = np.asarray(scale, dtype=np.float32).reshape(-1)
        q_name, s_name, out = (self.fresh(f"{name}_quantized"), self.fresh(f"{name}_scale"),
                               self.fresh(f"{name}_dequantized"))
        per_axis = scale.size > 1
        s_tensor = _float_tensor(s_name, scale if per_axis else scale[0])
        node = helper.make_node("DequantizeLinear", [q_name, s_name], [out],
                                name=self.fresh(f"{name}_DequantizeLinear"),
                                **({"axis": 0} if per_axis else {}))
        self._replace_initializer(name, [node], [_int_tensor(q_name, codes, dtype), s_tensor],
                                  out)
        return q_name

    def gathered_weight(self, name, indices, codebook):
        """Weight ``name`` := Gather(codebook, Cast(indices)): the K-Means weight sharing.

        Indices are uint4 (<= 16 centroids), uint8 (<= 256) or uint16."""
        dtype = next(t for n, t in ((16, TensorProto.UINT4), (256, TensorProto.UINT8),
                                    (1 << 16, TensorProto.UINT16)) if codebook.size <= n)
        i_name, c_name = self.fresh(f"{name}_indices"), self.fresh(f"{name}_codebook")
        as_int, out = self.fresh(f"{name}_indices_int64"), self.fresh(f"{name}_shared")
        nodes = [helper.make_node("Cast", [i_name], [as_int], to=TensorProto.INT64,
                                  name=self.fresh(f"{name}_Cast")),
                 helper.make_node("Gather", [c_name, as_int], [out], axis=0,
                                  name=self.fresh(f"{name}_Gather"))]
        self._replace_initializer(name, nodes, [_int_tensor(i_name, indices, dtype),
                                                _float_tensor(c_name, codebook)], out)
        return i_name

    def quantized_input(self, k, layer, lo, hi, scale, dtype):
        """Input 0 of node ``k`` := DequantizeLinear(QuantizeLinear(Clip(x, lo, hi), scale), scale)
        with zero point 0 of ``dtype``: round(clip(x) / scale) * scale."""
        node = self.graph.node[k]
        x = node.input[0]
        names = {k: self.fresh(f"{layer}_input_{k}") for k in
                 ("lo", "hi", "scale", "zero_point", "clipped", "quantized", "dequantized")}
        zero = np.zeros((), dtype=helper.tensor_dtype_to_np_dtype(dtype))
        self.graph.initializer.extend([
            _float_tensor(names["lo"], lo), _float_tensor(names["hi"], hi),
            _float_tensor(names["scale"], scale),
            numpy_helper.from_array(zero, names["zero_point"])])
        qz = [names["scale"], names["zero_point"]]
        self.before.setdefault(k, []).extend([
            helper.make_node("Clip", [x, names["lo"], names["hi"]], [names["clipped"]],
                             name=self.fresh(f"{layer}_input_Clip")),
            helper.make_node("QuantizeLinear", [names["clipped"]] + qz, [names["quantized"]],
                             name=self.fresh(f"{layer}_input_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [names["quantized"]] + qz,
                             [names["dequantized"]],
                             name=self.fresh(f"{layer}_input_DequantizeLinear"))])
        node.input[0] = names["dequantized"]

    def sign_input(self, k, layer, r):
        """Input 0 of node ``k`` := r where x >= 0, else -r (a 1-bit signed input grid)."""
        node = self.graph.node[k]
        x = node.input[0]
        zero, pos, neg = (self.fresh(f"{layer}_input_{k}") for k in ("zero", "pos", "neg"))
        cond, out = self.fresh(f"{layer}_input_nonneg"), self.fresh(f"{layer}_input_sign")
        self.graph.initializer.extend([_float_tensor(zero, 0.0), _float_tensor(pos, r),
                                       _float_tensor(neg, -r)])
        self.before.setdefault(k, []).extend([
            helper.make_node("GreaterOrEqual", [x, zero], [cond],
                             name=self.fresh(f"{layer}_input_GreaterOrEqual")),
            helper.make_node("Where", [cond, pos, neg], [out],
                             name=self.fresh(f"{layer}_input_Where"))])
        node.input[0] = out

    def finish(self):
        """Put the new nodes in topological order and drop initializers nothing reads."""
        nodes = list(self.prefix_nodes)
        for k, node in enumerate(self.graph.node):
            nodes.extend(self.before.get(k, []))
            nodes.append(_copy(node))
            # the exporter's per-node trace (FX node, class path) is ~3/4 of a small model's file
            del nodes[-1].metadata_props[:]
        del self.graph.value_info[:]    # shapes ONNX Runtime infers itself
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        read = {n for node in self.graph.node for n in node.input}
        read |= {o.name for o in self.graph.output}
        kept = [_copy_tensor(t) for t in self.graph.initializer if t.name in read]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)
        return self.model


def _copy(node):
    copied = onnx.NodeProto()
    copied.CopyFrom(node)
    return copied


def _copy_tensor(tensor):
    copied = onnx.TensorProto()
    copied.CopyFrom(tensor)
    return copied


def set_metadata(model, fields):
    """Store ``{key: JSON-able value}`` as ``haq.<key>`` metadata_props (values as JSON text)."""
    for key, value in fields.items():
        entry = model.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = json.dumps(value, allow_nan=False, sort_keys=True)


def read_metadata(model_or_path):
    """``{key: value}`` of the ``haq.*`` metadata_props of an ONNX model (or file)."""
    model = model_or_path
    if isinstance(model_or_path, str):
        model = onnx.load(model_or_path, load_external_data=False)
    return {p.key[len(METADATA_PREFIX):]: json.loads(p.value) for p in model.metadata_props
            if p.key.startswith(METADATA_PREFIX)}


def initializer_array(model, name):
    """An initializer as a numpy array (int4/uint4 unpacked to int8/uint8)."""
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    values = numpy_helper.to_array(tensor)
    widen = {TensorProto.INT4: np.int8, TensorProto.UINT4: np.uint8}.get(tensor.data_type)
    return values.astype(widen) if widen else values
