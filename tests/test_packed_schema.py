"""Packed files whose header or payload was edited and then RE-HASHED (issue 31, item 2).

The SHA-256 then passes, so only the reader's schema and value checks stand between such a
file and the model: each must end in one line naming the file and what was expected, and
nothing is written.  The files are small MobileNet-V2s (width 0.25, 10 classes, 32 px) packed
in both modes; their weights are drawn from 2^b - 1 values, so index 2^b - 1 is out of range.
"""
import copy
import hashlib
import json
import math
import os
import struct
import zlib

import pytest
import torch

from helpers import get_path, wrong_type
from lib.export import load_packed, write_packed
from lib.export.__main__ import main as export_main
from lib.quantize import apply_linear_policy, quant_layers
from lib.utils.errors import UserError, run_cli
from lib.utils.layers import quantizable_layers
from models import get_model

MAGIC = b"HAQPACK1"
KWARGS = dict(num_classes=10, input_size=32, width_mult=0.25)


def _kmeans_model():
    torch.manual_seed(0)
    model = get_model("mobilenetv2", **KWARGS)
    policy = [(2, 3, 32)[i % 3] for i in range(len(quantizable_layers(model)))]
    for (_, layer), bits in zip(quantizable_layers(model), policy):
        if bits != 32:
            values = torch.linspace(-0.5, 0.5, 2 ** bits - 1)
            layer.weight.data = values[torch.randint(0, 2 ** bits - 1, layer.weight.shape)]
    return model, policy


def _linear_model():
    torch.manual_seed(0)
    model = get_model("mobilenetv2", linear=True, **KWARGS)
    n = len(quant_layers(model))
    policy = [[8, -1]] + [[(2, 4, -1)[i % 3], 4] for i in range(n - 2)] + [[8, 8]]
    apply_linear_policy(model, policy)
    for layer in quant_layers(model):
        layer.weight_range.fill_(float(layer.weight.detach().abs().max()))
    return model, policy


def _packed(tmp_path_factory, mode):
    model, policy = _kmeans_model() if mode == "kmeans" else _linear_model()
    path = str(tmp_path_factory.mktemp(f"valid_{mode}") / "model.haq")
    write_packed(path, model, "mobilenetv2", KWARGS, mode, policy)
    with open(path, "rb") as f:
        data = f.read()
    rebuilt, _ = load_packed(path)
    return data, rebuilt.state_dict()


@pytest.fixture(scope="module")
def kmeans_file(tmp_path_factory):
    return _packed(tmp_path_factory, "kmeans")


@pytest.fixture(scope="module")
def linear_file(tmp_path_factory):
    return _packed(tmp_path_factory, "linear")


def split(data):
    """(header dict, payload bytearray) of a packed file."""
    head_len = struct.unpack_from("<Q", data, len(MAGIC))[0]
    start = len(MAGIC) + 8
    return json.loads(zlib.decompress(data[start:start + head_len])), bytearray(
        data[start + head_len:-32])


def assemble(header, payload, head=None, head_len=None):
    """A packed file of this header and payload with a correct SHA-256 (NaN written as JSON's
    NaN extension, so the checksum is no obstacle and only the reader's checks remain)."""
    if head is None:
        head = zlib.compress(json.dumps(header).encode("utf-8"), 9)
    length = len(head) if head_len is None else head_len
    body = MAGIC + struct.pack("<Q", length) + head + bytes(payload)
    return body + hashlib.sha256(body).digest()


def _entry(header, encoding, dtype=None):
    return next(e for e in header["entries"] if e["encoding"] == encoding
                and (dtype is None or e.get("dtype") == dtype))


def _put(payload, block, values):
    """Overwrite the start of a float32 block with ``values``."""
    raw = struct.pack(f"<{len(values)}f", *values)
    payload[block["offset"]:block["offset"] + len(raw)] = raw


def _fill(payload, block, byte):
    payload[block["offset"]:block["offset"] + block["nbytes"]] = bytes([byte]) * block["nbytes"]


def _bomb(header):
    """The header's JSON after 64 MiB of blanks (legal JSON), compressed to ~60 KB."""
    packer, blanks = zlib.compressobj(1), b" " * (1 << 20)
    parts = [packer.compress(blanks) for _ in range(64)]
    return b"".join(parts + [packer.compress(json.dumps(header).encode()), packer.flush()])


def _overlap(h, p):
    """Two float blocks of one size made to share bytes (a BN weight read as its bias)."""
    floats = [e for e in h["entries"] if e["encoding"] == "float" and e["dtype"] == "float32"]
    a, b = next((a, b) for a, b in zip(floats, floats[1:]) if a["nbytes"] == b["nbytes"])
    b["offset"] = a["offset"]


def _set(path, value):
    def edit(h, p):
        *parents, last = path
        node = h
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


# name: (mode, edit(header, payload) -> None or (head bytes, head_len), expected in the message)
CASES = {
    "negative_offset": ("kmeans", lambda h, p: _entry(h, "float").update(offset=-4), "offset"),
    "offset_past_the_end": ("kmeans", lambda h, p: _entry(h, "float").update(
        offset=len(p) + 64), "offset"),
    "overlapping_blocks": ("kmeans", _overlap, "offset"),
    "lying_sizes": ("kmeans", lambda h, p: h["sizes"].update(weights=h["sizes"]["weights"] + 999),
                    "'sizes'"),
    "lying_nbytes": ("kmeans", lambda h, p: _entry(h, "float").update(
        nbytes=_entry(h, "float")["nbytes"] - 4), "nbytes"),
    "lying_count": ("kmeans", lambda h, p: _entry(h, "kmeans").update(
        count=_entry(h, "kmeans")["count"] + 1), "count"),
    "file_longer_than_described": ("kmeans", lambda h, p: p.extend(bytes(100)),
                                   "header describes"),
    "nan_weights": ("kmeans", lambda h, p: _put(p, _entry(h, "float", "float32"), [math.nan]),
                    "NaN"),
    "nan_codebook": ("kmeans", lambda h, p: _put(p, _entry(h, "kmeans")["codebook"], [math.nan]),
                     "NaN"),
    "infinite_scale": ("linear", lambda h, p: _put(p, _entry(h, "linear")["scale"], [math.inf]),
                       "infinite"),
    "negative_scale": ("linear", lambda h, p: _put(p, _entry(h, "linear")["scale"], [-0.5]),
                       "expected >= 0"),
    "index_past_codebook": ("kmeans", lambda h, p: _fill(p, _entry(h, "kmeans")["indices"], 255),
                            "index"),
    "code_past_grid": ("linear", lambda h, p: _fill(p, next(
        e for e in h["entries"] if e.get("bits") == 2)["indices"], 255), "index"),
    "header_inflates_to_64_mib": ("kmeans", lambda h, p: (_bomb(h), None), "inflates"),
    "header_length_2_to_62": ("kmeans", lambda h, p: (zlib.compress(json.dumps(h).encode()),
                                                      1 << 62), "claims"),
    "header_not_zlib": ("kmeans", lambda h, p: (b"not zlib at all", None), "not zlib data"),
    "header_not_json": ("kmeans", lambda h, p: (zlib.compress(b'{"format": '), None), "JSON"),
    "header_key_twice": ("kmeans", lambda h, p: (zlib.compress(json.dumps(h).replace(
        '"mode": "kmeans"', '"mode": "linear", "mode": "kmeans"', 1).encode()), None),
        "appears twice"),
    "num_classes_1e8": ("kmeans", _set(("model_kwargs", "num_classes"), 1e8), "num_classes"),
    "width_mult_nan": ("kmeans", _set(("model_kwargs", "width_mult"), math.nan), "JSON"),
    "header_is_a_list": ("kmeans", lambda h, p: (zlib.compress(json.dumps([h]).encode()), None),
                         "the header is ["),
    "entry_is_a_list": ("kmeans", lambda h, p: h["entries"].__setitem__(
        0, list(h["entries"][0].values())), "entries[0]"),
    "wrong_dtype": ("kmeans", lambda h, p: _entry(h, "float").update(dtype="float64"), "dtype"),
    "width_0": ("kmeans", lambda h, p: _entry(h, "kmeans").update(bits=0), "bits"),
    "width_past_the_format": ("kmeans", lambda h, p: _entry(h, "kmeans").update(bits=17), "bits"),
    "codebook_over_2_to_bits": ("kmeans", lambda h, p: _entry(h, "kmeans")["codebook"].update(
        count=5), "count"),
    "policy_disagrees_with_entry": ("kmeans", _set(("policy", 0), 4), "at 4 bits"),
    "policy_99_bits": ("kmeans", _set(("policy", 1), 99), "policy[1]"),
    "half_wave_not_a_bool": ("linear", lambda h, p: h["half_wave"].update(
        {next(iter(h["half_wave"])): "yes"}), "half_wave"),
}


def craft(data, edit):
    header, payload = split(data)
    made = edit(header, payload)
    head, head_len = made if made else (None, None)
    return assemble(header, payload, head, head_len)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rehashed_crafted_file_is_refused_in_one_line(case, kmeans_file, linear_file, tmp_path,
                                                      capsys):
    mode, edit, expected = CASES[case]
    bad = tmp_path / "bad.haq"
    bad.write_bytes(craft((kmeans_file if mode == "kmeans" else linear_file)[0], edit))
    with pytest.raises(UserError) as exc:
        load_packed(str(bad))
    message = str(exc.value)
    assert expected in message and str(bad) in message and "\n" not in message
    with pytest.raises(SystemExit) as stop:
        run_cli(export_main, ["--load", str(bad)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == ["bad.haq"]       # nothing written


def test_writer_refuses_what_the_reader_would_and_writes_nothing(tmp_path):
    model, policy = _kmeans_model()
    model.state_dict()["features.0.1.weight"][0] = math.nan
    with pytest.raises(UserError, match="NaN"):
        write_packed(str(tmp_path / "nan.haq"), model, "mobilenetv2", KWARGS, "kmeans", policy)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------- generated mutations
EXTRA = "zz_unknown"


def _leaves(header):
    """Paths of the fields to mutate: every top-level field and every field below it, for
    the first entry of each kind (float32, int64, the policy's float weight, quantized)."""
    paths = [(k,) for k in header]
    paths += [("model_kwargs", k) for k in header["model_kwargs"]]
    paths += [("sizes", k) for k in header["sizes"]]
    paths += [("policy", 0), ("policy", len(header["policy"]) - 1)]
    if isinstance(header["policy"][0], list):
        paths += [("policy", 1, 0), ("policy", 1, 1)]
    if header["half_wave"]:
        paths.append(("half_wave", next(iter(header["half_wave"]))))
    picks = {}
    for i, e in enumerate(header["entries"]):
        kind = (e["encoding"], e.get("dtype"), e["key"].endswith(".weight"))
        picks.setdefault(kind, i)
    for i in picks.values():
        entry = header["entries"][i]
        for key, value in entry.items():
            paths.append(("entries", i, key))
            if isinstance(value, dict):
                paths += [("entries", i, key, k) for k in value]
        if entry["shape"]:
            paths.append(("entries", i, "shape", 0))
    return paths


def _objects(header, paths):
    """The objects holding the mutated fields, each once (they get the extra key)."""
    return sorted({p[:-1] for p in paths if p[:-1] and isinstance(get_path(header, p[:-1]), dict)}
                  | {()})


def _mutations(header):
    """``(label, edit, harmless)``: each field made a wrong type, negative, huge (10^18 and
    10^400, past a float's range), NaN or missing, and an unknown key added to each object
    (harmless where nothing reads it)."""
    paths = _leaves(header)
    for path in paths:
        value = get_path(header, path)
        for label, new in (("wrong type", wrong_type(value)), ("negative", -7),
                           ("huge", 10 ** 18), ("past float's range", 10 ** 400),
                           ("NaN", math.nan), ("missing", None)):
            if new == value and label != "missing":
                continue
            yield f"{'.'.join(map(str, path))}: {label}", _edit(path, new, label), False
    for obj in _objects(header, paths):
        yield f"{'.'.join(map(str, obj)) or 'header'}: extra key", _edit(obj + (EXTRA,), 1,
                                                                         "extra"), True


def _edit(path, new, label):
    def edit(h, p):
        parent = get_path(h, path[:-1])
        if label == "missing":
            del parent[path[-1]]
        else:
            parent[path[-1]] = new
    return edit


def _same_state(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def _run_mutations(data, reference, tmp_path):
    header = split(data)[0]
    outcome = {"refused": 0, "loaded identically": 0}
    for label, edit, harmless in _mutations(header):
        bad = tmp_path / "mutated.haq"
        bad.write_bytes(craft(data, edit))
        try:
            model, loaded = load_packed(str(bad))
        except UserError as exc:
            assert "\n" not in str(exc) and str(bad) in str(exc), label
            outcome["refused"] += 1
            continue
        assert harmless, f"{label}: loaded"
        assert _same_state(model.state_dict(), reference), label
        outcome["loaded identically"] += 1
    return outcome


@pytest.mark.parametrize("mode", ["kmeans", "linear"])
def test_every_mutated_header_field_is_refused_or_harmless(mode, kmeans_file, linear_file,
                                                           tmp_path):
    data, reference = kmeans_file if mode == "kmeans" else linear_file
    outcome = _run_mutations(data, reference, tmp_path)
    print(f"{mode}: {sum(outcome.values())} generated cases: {outcome}")
    assert outcome["refused"] > 200 and outcome["loaded identically"] >= 5
