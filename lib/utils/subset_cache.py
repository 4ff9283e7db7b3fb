"""The search's decoded-subset cache: its fixed subsets decoded once into uint8 stores.

Every search episode fine-tunes on the same training subset and validates on the same
validation subset (docs/design.md section 3), so decoding their JPEGs again each episode
repeats identical work. ``--data_cache DIR`` decodes each subset once into a store file in
DIR that every later episode, run and rank reads through a memory map.

A store file is a header, then the labels (int64), the original image sizes (int32 w, h)
and the pixels (uint8, N x 3 x H x W). The header holds the key (what was decoded: dataset
folder, a digest of its file list and of the subset files' sizes and mtimes, the subset's
indices and seed, the transform), the shape, and checksums of the index (labels + sizes)
and of the pixels. A store is never trusted on its name alone: a different key, a short
file or a checksum that disagrees rebuilds it, with a warning. Builds run under the cache
folder's lock (lib/utils/lock.py, waiting for another builder) into a temporary file that
is renamed into place, so a reader sees a complete store or none.

The file name carries a digest of the settings (folder, kind, transform, indices), so runs
with different settings share a folder without evicting each other; the file list's digest
is only in the header, so an edited dataset rebuilds its stores in place.
"""
import hashlib
import json
import logging
import math
import os
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader

from .errors import UserError
from .lock import FolderLock

log = logging.getLogger(__name__)

FORMAT = 1
MAGIC = b"HAQSUBST"
_ALIGN = 4096
_CRC_CHUNK = 1 << 24   # bytes per zlib.crc32 call: bounded memory while checking a large store


class CorruptStore(Exception):
    """A store file that is not what its header says (the cache rebuilds it)."""


def file_list_digest(samples, indices):
    """sha256 over every (relative path, label) of a split and the (size, mtime) of the files
    at ``indices``: a renamed, added or removed file moves the indices; an edited subset
    file changes the bytes the store holds."""
    h = hashlib.sha256()
    root = os.path.commonpath([p for p, _ in samples]) if samples else ""
    for path, label in samples:
        h.update(f"{os.path.relpath(path, root)}\0{label}\n".encode())
    for i in indices:
        st = os.stat(samples[i][0])
        h.update(struct.pack("<qq", st.st_size, st.st_mtime_ns))
    return h.hexdigest()


def store_key(root, kind, transform, shape, indices, seed, files):
    """The key a store is built for (JSON-able): ``shape`` is one image's stored shape,
    ``files`` is :func:`file_list_digest`."""
    return {"format": FORMAT, "root": os.path.abspath(root), "kind": kind,
            "transform": transform, "shape": list(shape), "seed": int(seed),
            "indices": hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest(),
            "files": files}


def store_path(folder, label, key):
    settings = {k: v for k, v in key.items() if k != "files"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(folder, f"{label}_{key['kind']}_{digest}.subset")


def _layout(head, n, shape):
    """(labels, sizes, pixels, end) byte offsets of a store whose header ends at ``head``."""
    labels = _round_up(head)
    sizes = labels + 8 * n
    pixels = _round_up(sizes + 8 * n)
    return labels, sizes, pixels, pixels + n * int(np.prod(shape))


def _round_up(x):
    return -(-x // _ALIGN) * _ALIGN


def _crc(array):
    flat, crc = array.reshape(-1), 0
    for start in range(0, flat.size, _CRC_CHUNK):
        crc = zlib.crc32(flat[start:start + _CRC_CHUNK], crc)
    return crc


class Store:
    """An open store: ``labels`` and ``sizes`` (tensors) and ``pixels`` (read-only memmap)."""

    def __init__(self, path, key):
        self.path, self.key = path, key
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise CorruptStore("no store header")
            (length,) = struct.unpack("<Q", head[8:])
            try:
                header = json.loads(f.read(length).decode())
                n, shape = int(header["shape"][0]), tuple(int(v) for v in header["shape"][1:])
            except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
                raise CorruptStore("unreadable header") from None
        if header.get("key") != key:
            raise CorruptStore("built for another key")
        labels_at, sizes_at, pixels_at, end = _layout(16 + length, n, shape)
        if os.path.getsize(path) != end:
            raise CorruptStore(f"{os.path.getsize(path)} bytes, expected {end} (truncated)")
        self.labels = torch.from_numpy(np.fromfile(path, np.int64, n, offset=labels_at))
        self.sizes = torch.from_numpy(np.fromfile(path, np.int32, 2 * n, offset=sizes_at)
                                      .reshape(n, 2))
        index = self.labels.numpy().tobytes() + self.sizes.numpy().tobytes()
        if hashlib.sha256(index).hexdigest() != header.get("index_sha256"):
            raise CorruptStore("index checksum mismatch")
        self.pixels = np.memmap(path, np.uint8, "r", pixels_at, (n,) + shape)
        if _crc(self.pixels) != header.get("pixels_crc32"):
            raise CorruptStore("pixel checksum mismatch")
        self.built = False   # set by open_store when this call decoded the images

    def __len__(self):
        return len(self.labels)


def _write(path, key, decoded, n, shape, n_worker):
    """Decode ``decoded`` (a dataset of ((uint8 image, (w, h)), label)) into a new store at ``path``."""
    loader = DataLoader(decoded, batch_size=64, num_workers=n_worker, shuffle=False)
    labels, sizes = np.empty(n, np.int64), np.empty((n, 2), np.int32)
    probe = {"key": key, "shape": [n, *shape], "index_sha256": "0" * 64, "pixels_crc32": 0}
    length = len(json.dumps(probe).encode()) + 64   # room for the real checksums' digits
    labels_at, sizes_at, pixels_at, end = _layout(16 + length, n, shape)
    with open(path, "wb") as f:
        f.truncate(end)
    pixels = np.memmap(path, np.uint8, "r+", pixels_at, (n,) + tuple(shape))
    done = 0
    for (images, wh), target in loader:
        pixels[done:done + len(target)] = images.numpy()
        labels[done:done + len(target)] = target.numpy()
        sizes[done:done + len(target)] = wh.numpy()
        done += len(target)
    pixels.flush()
    header = dict(probe, index_sha256=hashlib.sha256(labels.tobytes() + sizes.tobytes())
                  .hexdigest(), pixels_crc32=_crc(pixels))
    del pixels
    text = json.dumps(header).encode().ljust(length)
    with open(path, "r+b") as f:
        f.write(MAGIC + struct.pack("<Q", length) + text)
        f.seek(labels_at)
        f.write(labels.tobytes())
        f.seek(sizes_at)
        f.write(sizes.tobytes())
        f.flush()
        os.fsync(f.fileno())


def open_store(folder, label, key, decoded, n_worker=0):
    """The store of ``key`` in ``folder``, built from ``decoded`` when missing or corrupt.

    ``decoded[i]`` is ((uint8 tensor of shape ``key["shape"]``, (w, h) of the original),
    label) of the subset's i-th image. ``store.built`` says whether this call decoded them.
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--data_cache '{folder}' is a file; expected a folder")
    path = store_path(folder, label, key)
    try:
        return Store(path, key)
    except FileNotFoundError:
        pass
    except CorruptStore as exc:
        log.warning("data cache '%s' not usable (%s); rebuilding it", path, exc)
    try:
        lock = FolderLock(folder, "--data_cache", wait=True).acquire()
    except OSError as exc:
        raise UserError(f"--data_cache '{folder}' cannot be written ({exc.strerror}); "
                        "expected a writable folder") from None
    try:
        try:   # another process may have built it while this one waited for the lock
            return Store(path, key)
        except (FileNotFoundError, CorruptStore):
            pass
        store = _build(path, key, decoded, n_worker)
        store.built = True
        return store
    finally:
        lock.release()


def _build(path, key, decoded, n_worker):
    """Write the store into a temporary file, rename it into place and open it."""
    log.info("decoding %d images into the data cache '%s'", len(decoded), path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        _write(tmp, key, decoded, len(decoded), tuple(key["shape"]), n_worker)
        os.replace(tmp, path)
        return Store(path, key)
    except (OSError, CorruptStore) as exc:   # a full disk, a store unreadable once written
        raise UserError(f"data cache '{path}' could not be built ({exc}); expected a writable "
                        "folder with room for it") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def normalise(batch, mean, std, fused=False):
    """uint8 (or whole-valued float) N x 3 x H x W, in any memory layout -> contiguous float
    (in place when the batch already is a contiguous float32 tensor).

    Default: as ToTensor (x / 255) then Normalize ((x - mean) / std), the same float operations
    in the same order, so the PIL path's bits (validation and calibration batches). ``fused``
    (training batches, whose crops are not PIL's anyway): the same affine map as one
    multiply-add per element, x * (1 / (255 std)) + (-mean / std), on each channel in place:
    one pass over the float batch instead of three; equal to the default within float
    rounding (a few ulp).
    """
    out = batch.to(torch.float32, memory_format=torch.contiguous_format)
    if fused:
        for c, (m, s) in enumerate(zip(mean, std)):
            shift = torch.tensor(-m / s, dtype=torch.float32)   # 0-dim: a scalar on any device
            torch.add(shift, out[:, c], alpha=1 / (255 * s), out=out[:, c])
        return out
    mean = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=batch.device).view(3, 1, 1)
    return out.div_(255).sub_(mean).div_(std)


def crop_boxes(sizes, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """(top, left, height, width), int64 tensors, of a RandomResizedCrop box for each (w, h)
    row of ``sizes``: torchvision's ``RandomResizedCrop.get_params`` drawn for a whole batch.

    Each box has get_params' law: up to ``tries`` draws of an area fraction uniform in
    ``scale`` and a log aspect ratio uniform in log ``ratio``, rounded to whole pixels; the
    first that fits the image is placed uniformly at random in it; when none fits, the
    centred crop of the whole image with its aspect ratio clamped to ``ratio``. The draws
    come from torch's global RNG, all images' tries at once.
    """
    width, height = sizes[:, 0].double(), sizes[:, 1].double()
    n = len(sizes)
    area = (width * height)[:, None] * torch.empty(n, tries, dtype=torch.float64).uniform_(*scale)
    aspect = torch.empty(n, tries, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1])).exp_()
    tw, th = (area * aspect).sqrt_().round_(), (area / aspect).sqrt_().round_()
    fits = (tw > 0) & (tw <= width[:, None]) & (th > 0) & (th <= height[:, None])
    first = fits.to(torch.uint8).argmax(1, keepdim=True)   # the first fitting try
    found = fits.any(1)
    lo, hi = min(ratio), max(ratio)
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > hi, (height * hi).round(), width)
    fallback_h = torch.where(in_ratio < lo, (width / lo).round(), height)
    w = torch.where(found, tw.gather(1, first)[:, 0], fallback_w)
    h = torch.where(found, th.gather(1, first)[:, 0], fallback_h)
    spot = torch.rand(n, 2, dtype=torch.float64)
    top = torch.where(found, (spot[:, 0] * (height - h + 1)).floor(), (height - h).div(2).floor())
    left = torch.where(found, (spot[:, 1] * (width - w + 1)).floor(), (width - w).div(2).floor())
    return top.long(), left.long(), h.long(), w.long()


def random_resized_crop(batch, sizes, out, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The released RandomResizedCrop + RandomHorizontalFlip, on stored uint8 images.

    Each stored image (N x H x W x 3, PIL's layout, which the CPU's uint8 resize reads
    fastest) is its whole original resized to a square; the crop box is drawn on the
    original's (w, h) (:func:`crop_boxes`, torchvision's law), mapped to the stored pixels
    (edges rounded to the stored grid) and resized to ``out`` (bilinear, antialiased like
    PIL). Each crop is mirrored with probability 1/2, before its resize (which is
    symmetric: the same as mirroring its result, up to the rounding of its weights).
    Returns N x 3 x out x out float32 of whole values 0-255, contiguous: each resized crop
    is converted into it while it is still in the cache.
    """
    side_h, side_w = batch.shape[1:3]
    top, left, h, w = crop_boxes(sizes, scale, ratio)
    flips = (torch.rand(len(batch)) < 0.5).tolist()
    height, width = sizes[:, 1].double(), sizes[:, 0].double()
    y0 = (top * side_h / height).round().long()
    x0 = (left * side_w / width).round().long()
    y1 = torch.maximum(y0 + 1, ((top + h) * side_h / height).round().long())
    x1 = torch.maximum(x0 + 1, ((left + w) * side_w / width).round().long())
    work = batch if batch.device.type == "cpu" else batch.float()   # uint8 resize: CPU only
    crops = torch.empty((len(batch), 3, out, out), dtype=torch.float32, device=batch.device)
    images = work.permute(0, 3, 1, 2)
    boxes = zip(y0.tolist(), x0.tolist(), y1.tolist(), x1.tolist(), flips)
    for k, (a, b, c, d, flip) in enumerate(boxes):
        # a channels-last copy of the crop (a flip's copy keeps the layout): the resize's
        # fast path. Sliced with its batch dimension: image[None] would get a stride that
        # hides the channels-last layout.
        crop = images[k:k + 1, :, a:c, b:d]
        crop = crop.flip(3) if flip else crop.contiguous(memory_format=torch.channels_last)
        crops[k] = F.interpolate(crop, size=(out, out), mode="bilinear", align_corners=False,
                                 antialias=True)[0]
    if work is not batch:
        crops.round_().clamp_(0, 255)
    return crops


def padded_random_crop(batch, padding):
    """The released small-image RandomCrop(size, padding) (zero border) on a uint8 batch."""
    from torchvision import transforms
    size = batch.shape[-1]
    padded = F.pad(batch, (padding,) * 4)
    fake = torch.empty(()).expand(3, *padded.shape[-2:])
    crops = []
    for image in padded:
        i, j, _, _ = transforms.RandomCrop.get_params(fake, (size, size))
        crops.append(image[:, i:i + size, j:j + size])
    return torch.stack(crops)


class CachedLoader:
    """Batches of a store, shaped as a DataLoader's: (normalised images, labels).

    ``sampler`` picks the order (RandomSampler, DistributedSampler, ShardSampler, ...;
    its ``set_epoch`` is reached as ``loader.sampler``); ``augment(uint8 batch, sizes)``
    (optional) runs on ``device``, so on a GPU the crops run there and only uint8 crosses.
    Augmented (training) batches get :func:`normalise`'s fused form; the others its exact
    one, so validation and calibration inputs are the PIL path's bits.
    """

    def __init__(self, store, batch_size, sampler, mean, std, augment=None, device="cpu"):
        self.store, self.sampler, self.augment = store, sampler, augment
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last=False)
        self.mean, self.std, self.device = mean, std, torch.device(device)

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        for indices in self.batch_sampler:
            idx = np.asarray(indices, dtype=np.int64)
            images = torch.from_numpy(self.store.pixels[idx])
            if self.device.type == "cuda":
                images = images.pin_memory().to(self.device, non_blocking=True)
            if self.augment is not None:
                images = self.augment(images, self.store.sizes[idx])
            yield (normalise(images, self.mean, self.std, fused=self.augment is not None),
                   self.store.labels[idx])
