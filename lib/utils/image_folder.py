"""ImageFolder splits read without trusting the folder (docs/design.md section 7): image files
found by their first bytes, classes that share a folder refused, 16-bit and palette images
brought to 8-bit RGB, an unreadable image replaced by another of its class with a warning."""
import itertools
import logging
import os

import numpy as np
from torch.utils.data import Dataset

from .errors import UserError

log = logging.getLogger(__name__)


# First bytes of each format torchvision's ImageFolder reads (its IMG_EXTENSIONS).
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*",
                     b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
_WARN_NAMES = 3   # how many offending names a warning or error quotes


def few_names(items, n=_WARN_NAMES):
    """'a, b, c (+4 more)': the first few of a list, for one-line messages."""
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more


def _has_image_header(path):
    """True when the file starts like a JPEG/PNG/BMP/TIFF/PPM/PGM/WebP (one 12-byte read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def image_class_names(split_dir):
    """Sorted class folder names of one split (symlinked folders count; hidden ones do not)."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _folder_id(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _class_files(class_dir, other_classes=()):
    """Every file under a class folder once, in torchvision's order (folders, then names sorted).

    Symlinked folders are followed, but a folder reached twice (a symlink loop, or two
    links to one folder) is walked once, and a file reached twice (a link to a file of
    the same class, a hard link) is listed once, so no image is counted twice. The
    folders ``other_classes`` (ids from ``_folder_id``) are not entered: a link up the
    tree must not pull another class's images into this one.
    """
    seen_dirs, seen_files, folders, pending = set(other_classes), set(), [], [class_dir]
    while pending:
        folder = pending.pop()
        try:
            folder_id = _folder_id(folder)
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        if folder_id in seen_dirs:
            continue
        seen_dirs.add(folder_id)
        files = []
        for e in entries:
            try:
                if e.is_dir():
                    pending.append(e.path)
                elif e.is_file():
                    key = (e.stat().st_dev, e.stat().st_ino)
                    if key not in seen_files:
                        seen_files.add(key)
                        files.append(e.name)
            except OSError:   # a dangling link
                continue
        folders.append((folder, sorted(files)))
    return [os.path.join(folder, name) for folder, names in sorted(folders) for name in names]


def _refuse_shared_class_folders(split_dir, roots):
    """UserError when two class names ({name: folder id}) are one folder (a link to another class).

    Each would label the same images with its own index, so the model is taught two answers
    for one image; the folder ids (device, inode) resolve links and bind mounts alike.
    """
    first = {}
    for name, folder in roots.items():
        if folder in first:
            real = os.path.realpath(os.path.join(split_dir, name))
            raise UserError(f"class folders '{first[folder]}' and '{name}' of '{split_dir}' are "
                            f"one folder ('{real}'), so its images would carry two labels; "
                            "expected one folder per class (remove the link)")
        first[folder] = name


def scan_image_folder(split_dir, classes):
    """(samples [(path, class index)], skipped paths) of one split, ``classes`` giving the indices.

    A file is kept when its extension is an image one *and* its first bytes are an
    image header (a cheap read that catches text or HTML saved as .JPEG); the rest are
    skipped. A class left without images, or two classes that are one folder, is a UserError.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS
    samples, skipped, empty = [], [], []
    roots = {name: _folder_id(os.path.join(split_dir, name)) for name in classes}
    _refuse_shared_class_folders(split_dir, roots)
    for index, name in enumerate(classes):
        kept = 0
        others = set(roots.values()) - {roots[name]}
        for path in _class_files(os.path.join(split_dir, name), others):
            if path.lower().endswith(IMG_EXTENSIONS) and _has_image_header(path):
                samples.append((path, index))
                kept += 1
            else:
                skipped.append(path)
        if not kept:
            empty.append(name)
    if empty:
        raise UserError(f"no images in {len(empty)} class folder(s) of '{split_dir}': "
                        f"{few_names(empty)}; "
                        f"expected image files ({', '.join(IMG_EXTENSIONS)})")
    return samples, skipped


# Single-channel modes deeper than 8 bits. PIL's convert("RGB") clips them at 255 instead of
# scaling: a 16-bit image turns almost white, a float one in [0, 1] almost black.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SIXTEEN_BIT_MAX = 65535


def _deep_to_8bit(image):
    """A 16-bit ('I;16*', or 'I' within 0..65535) or float ('F') image as mode 'L'.

    16-bit values are scaled by their range (x / 257 = x * 255 / 65535). Float values
    already in [0, 1], the usual range of a normalised float image, are taken as absolute
    levels, so the images of a class keep their relative brightness; any other range has
    no agreed meaning, so the image's own min and max set the scale. ValueError (the loader
    then replaces the image, with a warning) for non-finite floats or 'I' beyond 16 bits.
    """
    from PIL import Image
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"mode {image.mode} image holds NaN or infinite values")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode != "F":
        if lo < 0 or hi > _SIXTEEN_BIT_MAX:
            raise ValueError(f"mode {image.mode} image holds values {lo:g}..{hi:g}; expected "
                             f"0..{_SIXTEEN_BIT_MAX} (16 bits)")
        values = values / _SIXTEEN_BIT_MAX
    elif (lo < 0 or hi > 1) and hi > lo:
        values = (values - lo) / (hi - lo)
    # a constant float image outside [0, 1] has no span to scale by: clipped, like 8-bit data
    return Image.fromarray(np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8))


def load_rgb(path):
    """An image file as RGB: torchvision's pil_loader, with deep images scaled to 8 bits first."""
    from PIL import Image
    with open(path, "rb") as f:
        image = Image.open(f)
        if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
            image = _deep_to_8bit(image)
        return image.convert("RGB")


class ImageFolderSplit(Dataset):
    """One split of an ImageFolder dataset with a class list given from outside.

    Train and val share one class list (the train split's), so a class index means
    the same class in both. An image that cannot be decoded at load time (e.g. a
    truncated JPEG) is replaced by the next decodable image of its class, with a
    warning, instead of ending the epoch with a traceback; so is one whose header declares
    more pixels than PIL's decompression-bomb limit (the limit itself is left as it is).
    """

    def __init__(self, split_dir, classes, transform=None):
        self.root, self.classes, self.transform = split_dir, list(classes), transform
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples, skipped = scan_image_folder(split_dir, self.classes)
        self.targets = [t for _, t in self.samples]
        if skipped:
            log.warning("skipped %d file(s) of '%s' that are not images: %s", len(skipped),
                        split_dir, few_names(skipped))

    def __len__(self):
        return len(self.samples)

    def _candidates(self, index):
        """``index``, then the other images of its class, starting after it.

        Lazy: the scan of the other samples runs only when an image fails to decode,
        not on every load.
        """
        yield index
        target = self.targets[index]
        for i in itertools.chain(range(index + 1, len(self.samples)), range(index)):
            if self.targets[i] == target:
                yield i

    def __getitem__(self, index):
        from PIL.Image import DecompressionBombError
        for i in self._candidates(index):
            path, target = self.samples[i]
            try:
                image = load_rgb(path)
            # PIL's decode errors, and its refusal of a header declaring a giant image
            # (DecompressionBombError is not an OSError)
            except (OSError, ValueError, SyntaxError, DecompressionBombError) as exc:
                log.warning("cannot read image '%s' (%s); using another image of its class",
                            path, exc)
                continue
            return (self.transform(image) if self.transform else image), target
        raise UserError(f"no image of class '{self.classes[self.targets[index]]}' in "
                        f"'{self.root}' can be decoded; expected readable image files")
