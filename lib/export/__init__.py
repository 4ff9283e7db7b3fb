"""Packed files of a fine-tuned HAQ policy (docs/design.md section 15).

    header = export_checkpoint("checkpoints/<run>/checkpoint.pth.tar", "model.haq")
    model, header = load_packed("model.haq")       # from the file alone, no pickle
    for line in size_report(header): ...           # file vs the simulator's size prediction

The layout is documented in :mod:`lib.export.packed`; bit packing in :mod:`lib.export.bitpack`;
what a header may hold in :mod:`lib.export.schema`, checked by :mod:`lib.export.reader`.
CLI: ``python -m lib.export --resume CKPT --output model.haq`` / ``--load model.haq``.
"""
from lib.export.bitpack import pack_bits, packed_nbytes, unpack_bits
from lib.export.packed import pack_model, write_packed
from lib.export.reader import load_packed, read_header, read_packed, unpack
from lib.export.schema import MAGIC
from lib.export.report import model_from_checkpoint, export_checkpoint, predicted_sizes, size_report

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits", "MAGIC", "load_packed", "pack_model",
           "read_header", "read_packed", "unpack", "write_packed", "model_from_checkpoint",
           "export_checkpoint", "predicted_sizes", "size_report"]
