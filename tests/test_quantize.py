"""Tests of lib/quantize: K-Means weight sharing, linear fake quantization, policies."""
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn as nn

from lib.quantize import kmeans as km
from lib.quantize.kmeans import (CentroidSharer, apply_kmeans_policy, codebooks_state_dict,
                                 inertia, kmeans_1d, kmeans_quantize_model, label_dtype,
                                 load_codebooks)
from lib.quantize.linear import QConv2d, QLinear, calibrate, fake_quantize, kl_clip, n_steps
from lib.quantize.policy import apply_linear_policy, resolve_kmeans_policy
from lib.utils.errors import UserError


def masked_loop_update(model, codebooks):
    """The straightforward centroid-shared update, one masked pass per centroid: each centroid
    becomes the float64 mean of its members, which are set to it; a pruned layer's zeros stay 0."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, cb in codebooks.items():
            flat = modules[name].weight.data.view(-1)
            for j in range(cb.n_clusters):
                mask = cb.labels == j
                if mask.any():
                    mean = flat[mask].double().mean()
                    cb.centroids[j] = mean
                    flat.masked_fill_(mask, mean.to(flat.dtype))
            if cb.pruned:
                flat.masked_fill_(cb.labels == cb.n_clusters, 0.0)


def _update_both_and_compare(model, codebooks, twin, twin_books):
    """Same optimizer-like nudge on both copies, then the update must equal the masked loop."""
    with torch.no_grad():
        for a, b in zip(model.parameters(), twin.parameters()):
            noise = torch.randn_like(a) * 1e-2
            a.add_(noise)
            b.add_(noise)
    CentroidSharer(model, codebooks).step()
    masked_loop_update(twin, twin_books)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def tiny_cnn(quantized=False, seed=0):
    """conv(3->8) relu conv(8->16, stride 2) relu pool flatten linear(16->10): 3 layers."""
    torch.manual_seed(seed)
    conv, lin = (QConv2d, QLinear) if quantized else (nn.Conv2d, nn.Linear)
    kw = {"half_wave": False} if quantized else {}
    return nn.Sequential(
        conv(3, 8, 3, padding=1, **kw), nn.BatchNorm2d(8), nn.ReLU(),
        conv(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin(16, 10))


def distinct(t):
    return torch.unique(t.detach()).numel()


# --------------------------------------------------------------------------- K-Means


def test_label_dtype_is_smallest():
    assert label_dtype(2) == torch.uint8 and label_dtype(256) == torch.uint8
    assert label_dtype(257) == torch.int16 and label_dtype(32768) == torch.int16
    assert label_dtype(40000) == torch.int32


def test_kmeans_on_channels_last_weights_equals_contiguous():
    """--channels_last: codebooks of the logical (row-major) weights, and shared updates that
    write back through the strided layout, give what the contiguous model gets."""
    plain = tiny_cnn()
    strided = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert not strided[0].weight.is_contiguous()
    bits = [3, 2, 4]
    books = [kmeans_quantize_model(m, bits, n_iter=3, seed=0) for m in (plain, strided)]
    for a, b in zip(*(bk.values() for bk in books)):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    x = torch.randn(4, 3, 8, 8)
    y = torch.randint(0, 10, (4,))
    for model, codebooks in zip((plain, strided), books):
        sharer = CentroidSharer(model, codebooks)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)
                                              if model is strided else x), y).backward()
            opt.step()
            sharer.step()
    layers = [[m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
              for net in (plain, strided)]
    assert strided[0].weight.is_contiguous(memory_format=torch.channels_last)
    for b, la, lb in zip(bits, *layers):
        assert distinct(lb.weight) <= 2 ** b
        torch.testing.assert_close(lb.weight, la.weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["fast", "sklearn"])
def test_kmeans_quantize_bounds_distinct_values_also_after_shared_updates(method):
    model = tiny_cnn()
    bits = [3, 2, 4]
    codebooks = kmeans_quantize_model(model, bits, n_iter=3, method=method, seed=0)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for b, (name, cb), layer in zip(bits, codebooks.items(), layers):
        assert distinct(layer.weight) <= 2 ** b
        assert cb.labels.dtype == torch.uint8 and cb.labels.numel() == layer.weight.numel()
        assert torch.equal(cb.weight(layer.weight.shape), layer.weight.data)
    sharer = CentroidSharer(model, codebooks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    before = [l.weight.detach().clone() for l in layers]
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sharer.step()
    for b, layer, w0 in zip(bits, layers, before):
        assert distinct(layer.weight) <= 2 ** b
        assert not torch.equal(layer.weight, w0)  # it did train


def test_pruned_zeros_excluded_and_stay_zero():
    model = tiny_cnn()
    zero_masks = []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                mask = torch.rand_like(m.weight) < 0.5
                m.weight[mask] = 0.0
                zero_masks.append(mask)
    codebooks = kmeans_quantize_model(model, [2, 2, 2], is_pruned=True, seed=0)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for cb, layer, mask in zip(codebooks.values(), layers, zero_masks):
        assert cb.pruned and cb.centroids[-1] == 0 and (cb.centroids[:-1] != 0).all()
        assert (layer.weight[mask] == 0).all()
        assert (layer.weight[~mask] != 0).all()  # zeros were not a cluster of their own
        assert distinct(layer.weight) <= 4 + 1
    sharer = CentroidSharer(model, codebooks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        opt.step()
        sharer.step()
    for layer, mask in zip(layers, zero_masks):
        assert (layer.weight[mask] == 0).all()
        assert distinct(layer.weight) <= 5


def test_shared_update_matches_masked_loop():
    model = tiny_cnn()
    codebooks = kmeans_quantize_model(model, [3, 3, 2], seed=1)
    twin = tiny_cnn()
    twin.load_state_dict(model.state_dict())
    twin_books = load_codebooks({n: {k: (v.clone() if torch.is_tensor(v) else v)
                                     for k, v in s.items()}
                                 for n, s in codebooks_state_dict(codebooks).items()})
    _update_both_and_compare(model, codebooks, twin, twin_books)
    for name in codebooks:
        torch.testing.assert_close(codebooks[name].centroids, twin_books[name].centroids,
                                   rtol=0, atol=1e-6)


def test_channels_last_weights_are_quantized_and_shared_in_place():
    model = tiny_cnn().to(memory_format=torch.channels_last)
    assert not model[3].weight.is_contiguous()
    books = kmeans_quantize_model(model, [2, 2, 2], seed=0)
    assert torch.equal(books["3"].weight(model[3].weight.shape), model[3].weight.data)
    with torch.no_grad():
        model[3].weight.add_(torch.randn_like(model[3].weight) * 1e-3)
    CentroidSharer(model, books).step()
    assert distinct(model[3].weight) <= 4
    assert torch.equal(books["3"].weight(model[3].weight.shape), model[3].weight.data)


def test_free_high_bit_skips_then_reclusters():
    model = tiny_cnn()
    bits = [7, 2, 8]
    codebooks = kmeans_quantize_model(model, bits, seed=0)
    sharer = CentroidSharer(model, codebooks, free_high_bit=True)
    names = list(codebooks)
    assert sharer.active() == [names[1]]
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for layer in layers:
            layer.weight.add_(torch.randn_like(layer.weight) * 1e-3)
    sharer.step()
    assert distinct(layers[1].weight) <= 4
    assert distinct(layers[0].weight) > 2 ** 7 // 2  # free: left alone by the update
    assert sharer.recluster(n_iter=5, seed=0) == [names[0], names[2]]
    assert distinct(layers[0].weight) <= 2 ** 7 and distinct(layers[2].weight) <= 2 ** 8
    # free_high_bit at quantization time leaves the high-bit layers float
    model2 = tiny_cnn()
    assert list(kmeans_quantize_model(model2, bits, free_high_bit=True)) == [names[1]]


def test_codebooks_roundtrip_through_checkpoint():
    model = tiny_cnn()
    codebooks = kmeans_quantize_model(model, {"0": 3, "7": 2}, seed=0)
    buf = io.BytesIO()
    torch.save({"codebooks": codebooks_state_dict(codebooks)}, buf)
    buf.seek(0)
    loaded = load_codebooks(torch.load(buf, weights_only=True)["codebooks"])
    assert list(loaded) == ["0", "7"]
    for name, cb in codebooks.items():
        assert torch.equal(loaded[name].centroids, cb.centroids)
        assert torch.equal(loaded[name].labels, cb.labels) and loaded[name].bits == cb.bits


def test_fast_d2_sampling_is_exact():
    rng = np.random.default_rng(0)
    data = km._Sorted1D(rng.standard_normal(5000).astype(np.float32))
    centers = np.array([-1.0, 0.2, 1.5])
    cells = km._Cells(data, centers)
    d2 = np.min((data.xs[:, None].astype(np.float64) - centers) ** 2, axis=1)
    cum = np.cumsum(d2)
    np.testing.assert_allclose(cells.total, cum[-1], rtol=1e-6)
    r = rng.random(200) * cells.total
    expected = np.searchsorted(cum, r, side="right")  # first j with F(j + 1) > r
    got = cells.sample(r)
    # ties at float rounding may shift by one neighbour
    assert np.mean(got == expected) > 0.98 and np.max(np.abs(got - expected)) <= 1
    cand = np.array([-2.0, 0.0, 0.7, 3.0])
    brute = [np.minimum(d2, (data.xs.astype(np.float64) - c) ** 2).sum() for c in cand]
    np.testing.assert_allclose(cells.potential_with(cand), brute, rtol=1e-6)


def test_fast_lloyd_matches_brute_force_lloyd():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(3000).astype(np.float32)
    data = km._Sorted1D(x)
    start = np.sort(rng.choice(x, 8, replace=False).astype(np.float64))
    fast = km._lloyd(data, start.copy(), 4)
    c = start.copy()
    for _ in range(4):
        lab = np.argmin(np.abs(x[:, None] - c), axis=1)
        c = np.array([x[lab == j].astype(np.float64).mean() for j in range(8)])
    np.testing.assert_allclose(fast, np.sort(c), rtol=1e-6, atol=1e-7)


def test_fast_kmeans_objective_matches_sklearn():
    torch.manual_seed(0)
    ratios = []
    for i, (n, k) in enumerate([(3000, 4), (5000, 8), (2000, 16), (4000, 32)]):
        x = torch.randn(n) * (0.1 + i)
        fast = inertia(x, *kmeans_1d(x, k, 3, "fast", seed=i))
        ref = inertia(x, *kmeans_1d(x, k, 3, "sklearn", seed=i))
        ratios.append(fast / ref)
    assert np.mean(ratios) <= 1.02 and max(ratios) <= 1.08, ratios


def test_kmeans_degenerate_inputs():
    x = torch.tensor([0.5, 0.5, -0.25, 0.5])
    c, lab = kmeans_1d(x, 8)  # k > n and fewer distinct values than k
    assert torch.equal(c[lab.long()], x)
    with pytest.raises(ValueError):
        kmeans_1d(x, 2, method="nope")


def test_precomputed_centers_quantize_a_layer_as_clustering_it():
    torch.manual_seed(0)
    for is_pruned in (False, True):
        w = torch.randn(16, 8, 3, 3)
        w[w.abs() < 0.3] = 0
        centers = km.kmeans_centroids(km.clustering_values(w, is_pruned), 8, 3, "fast", 3)
        a, b = w.clone(), w.clone()
        cb_a = km.kmeans_quantize_layer(a, 3, is_pruned=is_pruned, seed=3)
        cb_b = km.kmeans_quantize_layer(b, 3, is_pruned=is_pruned, seed=99, centers=centers)
        assert torch.equal(a, b) and torch.equal(cb_a.labels, cb_b.labels)
        assert torch.equal(cb_a.centroids, cb_b.centroids)


# --------------------------------------------------------------------------- linear


def test_weight_error_within_half_step_inside_clip():
    torch.manual_seed(0)
    w = torch.randn(1000)
    for bits in (2, 4, 8):
        t = torch.tensor([1.5])
        q = fake_quantize(w, t, bits, signed=True)
        scale = 1.5 / n_steps(bits, True)
        inside = w.abs() <= 1.5
        assert (q[inside] - w[inside]).abs().max() <= scale / 2 + 1e-6
        assert (q[~inside].abs() == 1.5).all()
        assert distinct(q) <= 2 ** bits - 1


def test_half_wave_activations_in_range_and_full_wave_symmetric():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 4
    layer = QConv2d(8, 8, 3, padding=1, a_bit=3, half_wave=True)
    layer.activation_range.data.fill_(2.5)
    q = fake_quantize(x, layer.activation_range, 3, signed=False)
    assert q.min() >= 0 and q.max() <= 2.5 and distinct(q) <= 8
    qf = fake_quantize(x, torch.tensor([2.5]), 3, signed=True)
    assert qf.min() >= -2.5 and qf.max() <= 2.5 and distinct(qf) <= 7
    # the layer's forward uses exactly that input
    ref = nn.functional.conv2d(q, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), ref)


def test_ste_gradient_inside_range_and_pact_range_gradient():
    x = torch.tensor([-1.0, 0.3, 1.2, 1.9, 2.5, 4.0], requires_grad=True)
    r = torch.tensor([2.0], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    fake_quantize(x, r, 2, signed=False).backward(g)
    inside = (x >= 0) & (x <= 2)
    assert torch.equal(x.grad[inside], g[inside]) and (x.grad[~inside] == 0).all()
    assert r.grad.item() == pytest.approx(5.0 + 6.0)  # clipped above: dy/dr = 1
    x.grad = r.grad = None
    fake_quantize(x, r, 3, signed=True).backward(g)
    assert torch.equal(x.grad[x.abs() <= 2], g[x.abs() <= 2])
    assert r.grad.item() == pytest.approx(5.0 + 6.0)  # -1 not clipped at -2


def test_shared_update_of_float64_weights_matches_masked_loop():
    model = tiny_cnn().double()
    codebooks = kmeans_quantize_model(model, [2, 3, 2], seed=0)
    twin = copy.deepcopy(model)
    books2 = copy.deepcopy(codebooks)
    _update_both_and_compare(model, codebooks, twin, books2)


@pytest.mark.parametrize("cls,args,shape", [(QConv2d, (4, 6, 3), (2, 4, 7, 7)),
                                            (QLinear, (5, 3), (4, 5))])
def test_unquantized_layer_is_bit_for_bit_the_float_layer(cls, args, shape):
    """Bits -1/-1: outputs and gradients of the float layer, fresh and after the layer has
    been quantized (and its ranges set) and switched off again; no gradient for the range."""
    torch.manual_seed(0)
    float_cls = nn.Conv2d if cls is QConv2d else nn.Linear
    q, f = cls(*args), float_cls(*args)
    missing, unexpected = q.load_state_dict(f.state_dict(), strict=False)
    assert sorted(missing) == ["activation_range", "weight_range"] and not unexpected
    x = torch.randn(*shape) * 10
    for used_quantized in (False, True):
        if used_quantized:
            q.set_bits(3, 3)
            q(x).sum().backward()
            assert q.weight_range.item() > 0
            q.set_bits(-1, -1)
        q.zero_grad(set_to_none=True)
        f.zero_grad(set_to_none=True)
        assert torch.equal(q(x), f(x))
        xq, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        q(xq).sum().backward()
        f(xf).sum().backward()
        assert torch.equal(xq.grad, xf.grad) and torch.equal(q.weight.grad, f.weight.grad)
        assert torch.equal(q.bias.grad, f.bias.grad) and q.activation_range.grad is None


def test_state_dict_entries_and_set_bits():
    layer = QLinear(3, 2, w_bit=4, a_bit=4)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "activation_range", "weight_range"}
    assert sd["activation_range"].shape == (1,) and sd["weight_range"].shape == (1,)
    assert isinstance(layer.activation_range, nn.Parameter) and layer.activation_range == 6
    layer.set_bits(-1, -1)
    assert not layer.activation_range.requires_grad
    layer.set_bits(a_bit=5)
    assert layer.activation_range.requires_grad and layer.w_bit == -1 and layer.a_bit == 5


def test_calibrate_sets_every_range():
    model = tiny_cnn(quantized=True)
    layers = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    for layer, (w, a) in zip(layers, [(8, -1), (3, 4), (6, 8)]):
        layer.set_bits(w, a)
    data = [(torch.randn(8, 3, 8, 8) * 0.1, torch.zeros(8))]
    model.train()
    calibrate(model, data, torch.device("cpu"), kl_max_bit=4)   # HAQ's rule: KL below 5 bits
    assert model.training and not any(m.calibrating for m in layers)
    for layer in layers:
        assert layer.weight_range.item() > 0
        assert 0 < layer.activation_range.item() < 6  # inputs here are small: min(6, max|x|)
    assert layers[0].weight_range.item() == pytest.approx(layers[0].weight.abs().max().item())
    assert layers[1].weight_range.item() == pytest.approx(kl_clip(layers[1].weight, 3))
    calibrate(model, data, torch.device("cpu"))   # default: max clip at every width
    assert layers[1].weight_range.item() == pytest.approx(layers[1].weight.abs().max().item())


# --------------------------------------------------------------------------- policies


def test_policy_by_order_and_by_name():
    model = tiny_cnn(quantized=True)
    plan = apply_linear_policy(model, [[8, -1], [4, 5], [6, 6]])
    assert plan == [("0", 8, -1), ("3", 4, 5), ("7", 6, 6)]
    assert (model[3].w_bit, model[3].a_bit) == (4, 5)
    apply_linear_policy(model, {"7": [2, 3]})
    assert (model[7].w_bit, model[7].a_bit) == (2, 3) and model[3].w_bit == 4
    apply_linear_policy(model, {"module.7": [3, 3]})  # a DataParallel-prefixed name
    assert model[7].w_bit == 3
    plan = resolve_kmeans_policy(model, np.array([4, 32, -1]))
    assert [(n, b) for n, _, b in plan] == [("0", 4), ("3", None), ("7", None)]
    books = apply_kmeans_policy(tiny_cnn(), {"3": 2}, seed=0)
    assert list(books) == ["3"]


@pytest.mark.parametrize("policy,match", [
    ([4, 4], "expected 3"),
    ({"nope": 4}, "unknown layer"),
    ([4, 0, 4], "out of range"),
    ([4, 2.5, 4], "not an integer"),
    ("444", "must be a list"),
])
def test_bad_kmeans_policies_raise_user_error(policy, match):
    with pytest.raises(UserError, match=match):
        resolve_kmeans_policy(tiny_cnn(), policy)


def test_bad_linear_policies_raise_user_error():
    model = tiny_cnn(quantized=True)
    with pytest.raises(UserError, match="expected 3"):
        apply_linear_policy(model, [[8, 8]] * 4)
    with pytest.raises(UserError, match="pair"):
        apply_linear_policy(model, [[8, 8], 4, [8, 8]])
    with pytest.raises(UserError, match="activations"):
        apply_linear_policy(model, [[8, 8], [4, 17], [8, 8]])
    with pytest.raises(UserError, match="no QConv2d/QLinear"):
        apply_linear_policy(tiny_cnn(), [[8, 8]] * 3)


# --------------------------------------------------------------------------- Q models


@pytest.mark.parametrize("arch,n_layers", [("mobilenetv2", 53), ("resnet50", 54),
                                           ("mobilenet", 28)])
def test_float_checkpoint_loads_into_q_twin(arch, n_layers):
    models = pytest.importorskip("models")
    from lib.utils.layers import quantizable_layers
    kw = {"num_classes": 10, "input_size": 32}
    if arch != "resnet50":
        kw["width_mult"] = 0.25
    torch.manual_seed(0)
    fmodel = models.get_model(arch, **kw)
    qmodel = models.get_model("q" + arch, **kw)
    missing, unexpected = qmodel.load_state_dict(fmodel.state_dict(), strict=False)
    assert not unexpected
    assert {k.rsplit(".", 1)[1] for k in missing} == {"activation_range", "weight_range"}
    qlayers = quantizable_layers(qmodel, linear=True)
    assert len(qlayers) == n_layers == len(quantizable_layers(fmodel))
    assert len(missing) == 2 * n_layers
    fmodel.eval()
    qmodel.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(qmodel(x), fmodel(x))  # all bits -1: the float model
