"""Hostile dataset inputs (issue 31, item 5): each is refused or warned about in one line."""
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers import image_tree
from lib.utils import make_data
from lib.utils.data_utils import ImageFolderSplit, build_datasets
from lib.utils.errors import UserError


def _png_declaring(width, height):
    """A 57-byte PNG whose header declares width x height grey pixels (and holds none)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + \
        chunk(b"IEND", b"")


def test_decompression_bomb_is_skipped_with_a_warning(tmp_path, caplog):
    root = image_tree(tmp_path, {"train": ("a", "b"), "val": ("a", "b")})
    bomb = tmp_path / "train" / "b" / "1.png"
    bomb.write_bytes(_png_declaring(20000, 20000))
    limit = Image.MAX_IMAGE_PIXELS
    train, _ = build_datasets(root, train_transform=False)
    index = [p for p, _ in train.samples].index(str(bomb))
    with caplog.at_level("WARNING"):
        x, y = train[index]
    assert y == 1 and x.shape == (3, 224, 224)   # another image of class b stands in
    warned = [r.getMessage() for r in caplog.records if "cannot read image" in r.getMessage()]
    assert len(warned) == 1 and str(bomb) in warned[0] and "\n" not in warned[0]
    assert Image.MAX_IMAGE_PIXELS == limit


def _single_image_split(tmp_path, image, name):
    """An ImageFolderSplit (no transform) whose first sample is ``image`` saved as a/``name``;
    a/zz.png and b/0.png are plain 4x4 images."""
    for c in ("a", "b"):
        (tmp_path / c).mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / c / ("zz.png" if c == "a" else "0.png"))
    image.save(tmp_path / "a" / name)
    return ImageFolderSplit(str(tmp_path), ["a", "b"])


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    values = np.array([[0, 257, 257 * 100, 65535]], dtype=np.uint16)
    ds = _single_image_split(tmp_path, Image.fromarray(values), "deep.png")
    assert Image.open(ds.samples[0][0]).mode == "I;16"
    rgb = np.asarray(ds[0][0])
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 1, 100, 255]       # x / 257; convert("RGB") gave 0, 255 x3
    assert (rgb == rgb[..., :1]).all()                     # grey stays grey


def test_32_bit_int_tiff_within_16_bits_is_scaled(tmp_path):
    values = np.array([[0, 257 * 10, 257 * 200, 65535]], dtype=np.int32)
    ds = _single_image_split(tmp_path, Image.fromarray(values), "deep.tif")
    assert Image.open(ds.samples[0][0]).mode == "I"
    assert np.asarray(ds[0][0])[0, :, 0].tolist() == [0, 10, 200, 255]


@pytest.mark.parametrize("values, expected", [
    ([0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),            # in [0, 1]: absolute levels
    ([0.2, 0.2, 0.6, 0.6], [51, 51, 153, 153]),            # ... not stretched to its min-max
    ([-1.0, 0.0, 1.0, 3.0], [0, 64, 128, 255]),            # any other range: min-max
    ([100.0, 150.0, 200.0, 300.0], [0, 64, 128, 255]),
])
def test_float_tiff_is_scaled_not_zeroed(tmp_path, values, expected):
    ds = _single_image_split(tmp_path, Image.fromarray(np.array([values], np.float32)), "f.tif")
    assert Image.open(ds.samples[0][0]).mode == "F"
    assert np.asarray(ds[0][0])[0, :, 0].tolist() == expected


def test_float_tiff_with_nan_is_replaced_with_a_warning(tmp_path, caplog):
    values = np.array([[0.0, np.nan, 0.5, 1.0]], np.float32)
    ds = _single_image_split(tmp_path, Image.fromarray(values), "nan.tif")
    with caplog.at_level("WARNING"):
        image, target = ds[0]
    assert target == 0 and np.asarray(image).shape == (4, 4, 3)   # a/zz.png stands in
    assert any("nan.tif" in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records)


def test_8_bit_images_load_as_torchvision_loads_them(tmp_path):
    from torchvision.datasets.folder import pil_loader
    from lib.utils.image_folder import load_rgb
    rng = np.random.default_rng(0)
    images = {"rgb.png": Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)),
              "grey.png": Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8)),
              "pal.png": Image.new("RGB", (5, 6), (9, 99, 199)).convert("P"),
              "rgba.png": Image.new("RGBA", (5, 6), (9, 99, 199, 10))}
    for name, image in images.items():
        image.save(tmp_path / name)
        assert np.array_equal(np.asarray(load_rgb(tmp_path / name)),
                              np.asarray(pil_loader(tmp_path / name))), name


def test_class_folder_linked_to_another_class_is_refused(tmp_path):
    root = image_tree(tmp_path, {"train": ("cat", "dog"), "val": ("cat", "dog")})
    (tmp_path / "train" / "puppy").symlink_to(tmp_path / "train" / "dog", target_is_directory=True)
    (tmp_path / "val" / "puppy").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "puppy" / "0.png")
    with pytest.raises(UserError) as err:
        build_datasets(root)
    msg = str(err.value)
    assert "'dog' and 'puppy'" in msg and "two labels" in msg and "\n" not in msg


def test_one_class_dataset_is_refused(tmp_path):
    root = image_tree(tmp_path, {"train": ("only",), "val": ("only",)})
    with pytest.raises(UserError, match=r"only one class folder .*'only'.* at least 2 classes"):
        build_datasets(root)


def _imagenet(tmp_path, wnids):
    src = tmp_path / "imagenet"
    for split in ("train", "val"):
        for wnid in wnids:
            (src / split / wnid).mkdir(parents=True, exist_ok=True)
    return src


def _run(src, dst, classes_file, wnids):
    classes_file.write_text("".join(w + "\n" for w in wnids))
    return make_data.main(["--src", str(src), "--dst", str(dst), "--classes", str(classes_file)])


def _listing(dst):
    return sorted((p.relative_to(dst).as_posix(), os.readlink(p) if p.is_symlink() else None)
                  for p in dst.rglob("*"))


def test_make_data_refuses_a_dst_from_another_class_list(tmp_path):
    src = _imagenet(tmp_path, ["n00000001", "n00000002", "n00000003"])
    dst, classes = tmp_path / "subset", tmp_path / "classes.txt"
    assert _run(src, dst, classes, ["n00000001", "n00000002"]) == 4
    before = _listing(dst)
    with pytest.raises(UserError, match=r"n00000002.*refused, nothing changed") as err:
        _run(src, dst, classes, ["n00000001", "n00000003"])   # n00000002 would stay a class
    assert "\n" not in str(err.value)
    assert _listing(dst) == before
    assert _run(src, dst, classes, ["n00000001", "n00000002"]) == 0   # the same run again


def test_make_data_never_replaces_a_users_link_or_file(tmp_path):
    src = _imagenet(tmp_path, ["n00000001", "n00000002"])
    mine = tmp_path / "my_birds"
    mine.mkdir()
    dst, classes = tmp_path / "subset", tmp_path / "classes.txt"
    (dst / "train").mkdir(parents=True)
    (dst / "train" / "n00000001").symlink_to(mine, target_is_directory=True)
    with pytest.raises(UserError, match=r"1 path\(s\) this run would not make: .*n00000001"):
        _run(src, dst, classes, ["n00000001", "n00000002"])
    assert os.readlink(dst / "train" / "n00000001") == str(mine)
    assert _listing(dst) == [("train", None), ("train/n00000001", str(mine))]
    os.remove(dst / "train" / "n00000001")
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        _run(src, dst, classes, ["n00000001", "n00000002"])
    assert _listing(dst) == [("notes.txt", None), ("train", None)]


def test_make_data_completes_its_own_partial_run(tmp_path):
    src = _imagenet(tmp_path, ["n00000001", "n00000002"])
    dst, classes = tmp_path / "subset", tmp_path / "classes.txt"
    (dst / "train").mkdir(parents=True)
    (dst / "train" / "n00000001").symlink_to(src / "train" / "n00000001")   # made, then stopped
    assert _run(src, dst, classes, ["n00000001", "n00000002"]) == 3
    assert [link for link, _ in _listing(dst)] == [
        "train", "train/n00000001", "train/n00000002", "val", "val/n00000001", "val/n00000002"]
