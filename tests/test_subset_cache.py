"""The decoded-subset cache (lib/utils/subset_cache.py): same validation bytes as the PIL
path, built once, rebuilt on a new key or a damaged file, one store when two processes build."""
import logging
import multiprocessing
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lib.utils import data_utils, image_folder, subset_cache
from lib.utils.errors import UserError

SIZES = dict(val_size=6, train_size=10)


def jpeg_tree(root, classes=("a", "b", "c"), per_class=6, seed=0):
    """root/{train,val}/<class>/<i>.jpg of noise, each image its own non-square size."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(per_class):
                w, h = (int(v) for v in rng.integers(40, 100, 2))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")
    return str(root)


@pytest.fixture
def tree(tmp_path):
    return jpeg_tree(tmp_path / "ds")


def search_data(root, cache=None, size=72, batch=4, **kw):
    return data_utils.get_search_data(root, batch, 0, data_root=root, input_size=size,
                                      data_cache=cache, **dict(SIZES, **kw))


def stores(data):
    return [data.train.store, data.val.store, data.calib.store]


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("size", [72, 32])   # the ImageNet transform, and the small-image one
def test_validation_and_calibration_inputs_are_the_pil_paths_bytes(tree, tmp_path, size):
    plain, cached = search_data(tree, size=size), search_data(tree, tmp_path / "c", size=size)
    for a_loader, b_loader in ((plain.val, cached.val), (plain.calib, cached.calib)):
        a, b = batches(a_loader), batches(b_loader)
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_second_build_reads_the_store_without_decoding(tree, tmp_path, monkeypatch):
    first = search_data(tree, tmp_path / "c")
    assert all(s.built for s in stores(first))
    before = batches(first.val)

    def no_decode(path):
        raise AssertionError(f"decoded {path} again")
    monkeypatch.setattr(image_folder, "load_rgb", no_decode)
    second = search_data(tree, tmp_path / "c")
    assert not any(s.built for s in stores(second))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(before, batches(second.val)))
    assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".tmp") or f == ".lock"]


def test_a_changed_key_builds_again(tree, tmp_path):
    cache = tmp_path / "c"
    search_data(tree, cache)
    assert len(os.listdir(cache)) == 3
    # other settings: their own stores beside the first ones
    assert all(s.built for s in stores(search_data(tree, cache, size=80)))
    assert all(s.built for s in stores(search_data(tree, cache, seed=7)))
    assert len(os.listdir(cache)) == 9
    # an edited validation-subset image: the validation store rebuilds in place with the new
    # bytes; the training subset's stores do not hold it and stay
    path = search_data(tree, cache).val.store.path
    first_val = data_utils.split_indices(18, **SIZES)[0][0]
    image_path = data_utils.build_datasets(tree, tree)[0].samples[first_val][0]
    Image.new("RGB", (60, 50), (255, 0, 0)).save(image_path)
    again = search_data(tree, cache)
    assert [s.built for s in stores(again)] == [False, True, False]
    assert again.val.store.path == path
    assert len(os.listdir(cache)) == 9
    red = batches(again.val)[0][0][0]
    assert torch.equal(red, batches(search_data(tree).val)[0][0][0])


def _build_in_child(root, cache, queue):
    data = search_data(root, cache)
    queue.put([s.built for s in stores(data)])


def test_two_processes_building_at_once_leave_one_valid_store(tree, tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(tree, tmp_path / "c", queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    built = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [sum(col) for col in zip(*built)] == [1, 1, 1]   # each store decoded once
    assert sorted(os.listdir(tmp_path / "c")) == sorted(
        os.path.basename(s.path) for s in stores(search_data(tree, tmp_path / "c")))
    assert all(torch.equal(a[0], b[0]) for a, b in
               zip(batches(search_data(tree).val), batches(search_data(tree, tmp_path / "c").val)))


def _damage_truncate(path):
    os.truncate(path, os.path.getsize(path) - 100)


def _damage_header(path):
    with open(path, "r+b") as f:
        f.write(b"garbage!")


def _damage_label(path):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[4096] ^= 1   # the first label (the header fits in one 4 KiB block here)
    with open(path, "wb") as f:
        f.write(data)


def _damage_pixel(path):
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_header, _damage_label,
                                    _damage_pixel])
def test_a_damaged_store_is_rebuilt_not_trusted(tree, tmp_path, damage, caplog):
    cache = tmp_path / "c"
    good = batches(search_data(tree, cache).val)
    path = search_data(tree, cache).val.store.path
    damage(path)
    with caplog.at_level(logging.WARNING):
        data = search_data(tree, cache)
    assert data.val.store.built and not data.train.store.built
    assert any("not usable" in r.getMessage() and path in r.getMessage() for r in caplog.records)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(good, batches(data.val)))


def test_a_store_for_another_key_is_refused(tree, tmp_path):
    data = search_data(tree, tmp_path / "c")
    with pytest.raises(subset_cache.CorruptStore, match="another key"):
        subset_cache.Store(data.val.store.path, dict(data.val.store.key, seed=99))


def test_a_cache_path_that_is_a_file_is_a_user_error(tree, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; expected a folder"):
        search_data(tree, tmp_path / "file")


def test_training_crops_keep_the_released_augmentation(tree, tmp_path):
    """ImageNet shape: crops of input size, flipped about half the time, from the image's
    whole area; small images: a padded random crop, i.e. a shifted window of the stored image."""
    data = search_data(tree, tmp_path / "c", batch=10)
    torch.manual_seed(0)
    x, _ = next(iter(data.train))
    assert x.shape == (10, 3, 72, 72) and torch.isfinite(x).all()
    store = data.train.store
    assert store.pixels.shape[1:] == (82, 82, 3)   # the whole image at the eval resize size
    assert (store.sizes.numpy() >= 40).all()     # the original sizes, for the crop boxes
    small = search_data(tree, tmp_path / "c", size=32, batch=10, shuffle=False)
    raw = torch.from_numpy(np.array(small.train.store.pixels[:10]))
    torch.manual_seed(0)
    crops = subset_cache.padded_random_crop(raw, 4)
    padded = torch.nn.functional.pad(raw, (4,) * 4)
    for crop, image in zip(crops, padded):
        windows = image.unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4)
        assert (windows == crop).flatten(2).all(-1).any()


def test_flip_and_crop_draws_follow_torchs_seed(tree, tmp_path):
    data = search_data(tree, tmp_path / "c", shuffle=False)
    torch.manual_seed(3)
    a = batches(data.train)
    torch.manual_seed(3)
    b = batches(data.train)
    torch.manual_seed(4)
    c = batches(data.train)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def _search_argv(tiny_pretrained, root, out, cache):
    return ["--dataset", root, "--width_mult", "0.25", "--input_size", "32",
            "--pretrained_path", tiny_pretrained[0], "--train_size", "16", "--val_size", "8",
            "--data_bsize", "8", "--n_worker", "0", "--train_episode", "1", "--warmup", "1",
            "--output", str(out), "--seed", "1", "--max_bit", "4", "--preserve_ratio", "0.2",
            "--data_cache", str(cache)]


@pytest.mark.slow   # two one-episode searches
def test_the_search_cli_builds_then_reads_the_cache(tiny_pretrained, tmp_path, monkeypatch):
    import rl_quantize
    root = jpeg_tree(tmp_path / "ten", classes=[f"c{i}" for i in range(10)], per_class=3)
    rl_quantize.main(_search_argv(tiny_pretrained, root, tmp_path / "o1", tmp_path / "c"))
    built = sorted(os.listdir(tmp_path / "c"))
    assert len(built) == 3 and all(f.endswith(".subset") for f in built)

    def no_decode(path):
        raise AssertionError(f"decoded {path} again")
    monkeypatch.setattr(image_folder, "load_rgb", no_decode)
    rl_quantize.main(_search_argv(tiny_pretrained, root, tmp_path / "o2", tmp_path / "c"))
    assert sorted(os.listdir(tmp_path / "c")) == built


def test_a_cache_flag_naming_a_file_ends_the_search_with_one_line(tiny_pretrained, tmp_path,
                                                                   capsys):
    import rl_quantize
    from lib.utils.errors import run_cli
    root = jpeg_tree(tmp_path / "ten", classes=[f"c{i}" for i in range(10)], per_class=3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(rl_quantize.main, _search_argv(tiny_pretrained, root, tmp_path / "o",
                                               tmp_path / "file"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == \
        f"error: --data_cache '{tmp_path / 'file'}' is a file; expected a folder"


def _cached_shards_on_rank(rank, world, init_file, root, cache, out_dir):
    import json
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        data = search_data(root, cache, distributed=True)
        data.train.sampler.set_epoch(1)
        seen = {"built": [s.built for s in stores(data)],
                "val": [int(i) for b in data.val.batch_sampler for i in b],
                "train": [int(i) for b in data.train.batch_sampler for i in b],
                "val_batches": [len(y) for _, y in data.val]}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)
    finally:
        dist.destroy_process_group()


def test_ranks_share_one_cache_and_split_the_subsets(tree, tmp_path):
    """torchrun's ranks: each store decoded once; validation indices split, none twice."""
    import json
    import torch.multiprocessing as mp
    mp.start_processes(_cached_shards_on_rank, nprocs=2, start_method="fork",
                       args=(2, str(tmp_path / "init"), tree, str(tmp_path / "c"), str(tmp_path)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [sum(col) for col in zip(*(r["built"] for r in ranks))] == [1, 1, 1]
    val = ranks[0]["val"] + ranks[1]["val"]
    assert sorted(val) == list(range(SIZES["val_size"]))
    assert all(max(r["val_batches"]) <= 2 for r in ranks)   # batch 4 over 2 ranks
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == SIZES["train_size"] // 2


def test_a_store_that_cannot_be_written_is_a_user_error(tree, tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(subset_cache, "_write", full_disk)
    with pytest.raises(UserError, match="could not be built .*No space left"):
        search_data(tree, tmp_path / "c")
    assert os.listdir(tmp_path) == ["ds"]   # no half-written store, no folder left behind


def _ramp_store(n, side):
    """n stored squares whose red channel is the column index and green the row index
    (side <= 256), so a crop's pixels say where in the stored image they came from."""
    ramp = torch.arange(side, dtype=torch.uint8)
    image = torch.stack([ramp.expand(side, side), ramp[:, None].expand(side, side),
                         torch.zeros(side, side, dtype=torch.uint8)], dim=-1)
    return image.expand(n, side, side, 3).contiguous()


def test_crop_boxes_draw_torchvisions_random_resized_crop_law():
    """Boxes for a batch have get_params' distribution (area fraction, aspect ratio, place),
    stay inside the image, and take its central fallback exactly when no try fits."""
    from torchvision import transforms
    n, (w, h) = 4000, (500, 375)
    torch.manual_seed(0)
    top, left, bh, bw = subset_cache.crop_boxes(torch.tensor([[w, h]] * n))
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + bh <= h).all() and (left + bw <= w).all() and (bh > 0).all() and (bw > 0).all()
    torch.manual_seed(1)
    ref = torch.tensor([transforms.RandomResizedCrop.get_params(
        torch.empty(()).expand(3, h, w), (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]).T

    def features(i, j, ch, cw):
        return {"area": (ch * cw).double() / (w * h), "log aspect": (cw / ch).double().log(),
                "centre x": (j + cw / 2).double() / w, "centre y": (i + ch / 2).double() / h}
    ours, theirs = features(top, left, bh, bw), features(*ref)
    for name in ours:   # two-sample Kolmogorov-Smirnov distance; 0.04 is p ~ 0.002 at n=4000
        grid = torch.cat([ours[name], theirs[name]]).sort().values
        cdf = [torch.searchsorted(x.sort().values, grid, right=True).double() / n
               for x in (ours[name], theirs[name])]
        assert (cdf[0] - cdf[1]).abs().max() < 0.04, name
    # no try can fit a 1000 x 20 strip (or its transpose): get_params' centred fallback
    for size in ([1000, 20], [20, 1000]):
        box = [int(v) for v in subset_cache.crop_boxes(torch.tensor([size]))]
        assert box == list(transforms.RandomResizedCrop.get_params(
            torch.empty(()).expand(3, size[1], size[0]), (0.08, 1.0), (3 / 4, 4 / 3)))


def test_training_crops_land_on_their_boxes_and_flip_half_the_time():
    """Each crop covers the stored pixels its box maps to (the ramp's mean is the box's
    centre, within a stored pixel), runs the ramp's way unless its flip was drawn, and
    flips come out at the rate 1/2 (1,024 draws: 0.5 +- 0.06 is over 3.5 sigma)."""
    n, side, out = 1024, 64, 24
    sizes = torch.tensor([[500, 375], [375, 500]] * (n // 2), dtype=torch.int32)
    torch.manual_seed(5)
    top, left, h, w = subset_cache.crop_boxes(sizes)
    flips = torch.rand(n) < 0.5
    torch.manual_seed(5)
    crops = subset_cache.random_resized_crop(_ramp_store(n, side), sizes, out)
    assert crops.shape == (n, 3, out, out) and crops.is_contiguous()
    assert crops.dtype == torch.float32 and torch.equal(crops, crops.round().clamp(0, 255))
    width, height = sizes[:, 0].double(), sizes[:, 1].double()
    x0, x1 = (left * side / width).round(), ((left + w) * side / width).round()
    y0, y1 = (top * side / height).round(), ((top + h) * side / height).round()
    assert ((crops[:, 0].mean((1, 2)) - (x0 + x1 - 1) / 2).abs() < 1).all()
    assert ((crops[:, 1].mean((1, 2)) - (y0 + y1 - 1) / 2).abs() < 1).all()
    slope = crops[:, 0, :, -1].mean(1) - crops[:, 0, :, 0].mean(1)
    wide = (x1 - x0) >= 4   # a crop a few stored pixels wide has a visible slope
    assert torch.equal((slope[wide] < 0), flips[wide])
    assert abs(flips.double().mean().item() - 0.5) < 0.06


def test_a_whole_image_crop_is_a_plain_resize():
    """A box covering the whole square (scale 1, the image's own aspect): the antialiased
    resize of the stored image, mirrored when flipped; within 1 grey level (uint8 rounding)
    of PIL's bilinear resize of the same image, the stored training square's maker."""
    rng = np.random.default_rng(0)
    stored = torch.from_numpy(rng.integers(0, 256, (8, 82, 82, 3), dtype=np.uint8))
    sizes = torch.tensor([[100, 100]] * 8, dtype=torch.int32)
    torch.manual_seed(0)
    crops = subset_cache.random_resized_crop(stored, sizes, 72, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flipped = 0
    for crop, image in zip(crops, stored):
        pil = torch.from_numpy(np.array(Image.fromarray(image.numpy()).resize(
            (72, 72), Image.BILINEAR))).permute(2, 0, 1).float()
        if (crop - pil).abs().max() > 1:
            crop, flipped = crop.flip(-1), flipped + 1
        assert (crop - pil).abs().max() <= 1
    assert 0 < flipped < 8


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fused_normalisation_equals_the_exact_one_within_float_rounding(layout):
    mean, std = data_utils.IMAGENET_MEAN, data_utils.IMAGENET_STD
    batch = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8).contiguous(
        memory_format=layout)
    exact = subset_cache.normalise(batch, mean, std)
    fused = subset_cache.normalise(batch, mean, std, fused=True)
    assert fused.is_contiguous() and fused.dtype == torch.float32
    assert torch.allclose(fused, exact, rtol=0, atol=2e-6)   # values up to ~2.7: a few ulp
    whole = batch.float().contiguous()   # the crops' float form: normalised in place
    assert subset_cache.normalise(whole, mean, std, fused=True).data_ptr() == whole.data_ptr()
    assert torch.allclose(whole, exact, rtol=0, atol=2e-6)


@pytest.mark.parametrize("saved,current,refused", [
    ({"cached_training": True}, {"cached_training": True, "data_cache": "/elsewhere"}, False),
    ({"cached_training": True}, {"cached_training": False, "data_cache": None}, True),
    ({"cached_training": False}, {"cached_training": True, "data_cache": "/c"}, True),
    # written before cached_training was recorded: its --data_cache flag stands for it
    ({"data_cache": "/c"}, {"cached_training": True, "data_cache": "/moved"}, False),
    ({"data_cache": "/c"}, {"cached_training": False, "data_cache": None}, True),
    ({"data_cache": None}, {"cached_training": True, "data_cache": "/c"}, True),
    ({}, {"cached_training": False, "data_cache": None}, False),   # older than the flag
    ({}, {"cached_training": True, "data_cache": "/c"}, True),
])
def test_a_resume_keeps_the_way_its_training_crops_were_made(saved, current, refused):
    from argparse import Namespace

    from lib.search.state import check_same_training_crops
    args = Namespace(**current)
    if not refused:
        check_same_training_crops("out", "out/state", saved, args)
        return
    with pytest.raises(UserError, match="training crops"):
        check_same_training_crops("out", "out/state", saved, args)


def test_a_recorded_training_crop_source_that_is_not_a_bool_is_refused():
    from argparse import Namespace

    from lib.search.state import check_same_training_crops
    with pytest.raises(UserError, match="'args.cached_training' is .*expected true or false"):
        check_same_training_crops("out", "out/state", {"cached_training": "yes"},
                                  Namespace(cached_training=True, data_cache="/c"))


@pytest.mark.slow   # two one-episode searches
def test_a_cached_search_records_it_and_resumes_only_cached(tiny_pretrained, tmp_path, capsys):
    import rl_quantize
    from lib.utils.checkpoint import load_checkpoint
    from lib.utils.errors import run_cli
    root = jpeg_tree(tmp_path / "ten", classes=[f"c{i}" for i in range(10)], per_class=3)
    argv = _search_argv(tiny_pretrained, root, tmp_path / "o", tmp_path / "c")
    out = rl_quantize.main(argv)["output"]
    state = load_checkpoint(os.path.join(out, rl_quantize.STATE_FILE))
    assert state["args"]["cached_training"] is True
    plain = argv[:argv.index("--data_cache")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(rl_quantize.main, plain + ["--train_episode", "2", "--resume_search", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: --resume_search") and "training crops" in err[-1]
    moved = argv[:-1] + [str(tmp_path / "c2")]   # another cache folder: the same crops
    rl_quantize.main(moved + ["--train_episode", "2", "--resume_search", out])
    assert load_checkpoint(os.path.join(out, rl_quantize.STATE_FILE))["episode"] == 2
