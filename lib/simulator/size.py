"""Model size: the K-Means search's cost and a table metric every cost model offers.

A layer's quantized weights take ``bits * #weights`` bits whatever the hardware;
activations and biases (kept in floating point) are not counted.
"""


def size_bits(shape, w_bits):
    """Bits of the weights of ``shape`` (a LayerShape) at ``w_bits`` each."""
    return float(w_bits * shape.n_weights)
