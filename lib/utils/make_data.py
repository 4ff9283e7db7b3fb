"""Build data/imagenet100 from data/imagenet with one symlink per class.

    python -m lib.utils.make_data [--src data/imagenet] [--dst data/imagenet100]

The 100 WordNet ids are in lib/utils/imagenet100.txt; both train/ and val/ must be
in ImageFolder layout (val/ sorted into class folders).
"""
import argparse
import logging
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lib.utils.cli import ArgumentParser  # noqa: E402
from lib.utils.errors import UserError, run_cli  # noqa: E402

CLASS_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet100.txt")


def read_classes(path=CLASS_LIST):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def make_subset(src, dst, classes):
    """Symlink ``src/{train,val}/<wnid>`` to ``dst/{train,val}/<wnid>``; returns links made."""
    made = 0
    for split in ("train", "val"):
        for wnid in classes:
            target = os.path.abspath(os.path.join(src, split, wnid))
            if not os.path.isdir(target):
                raise UserError(f"class folder '{target}' not found; expected ImageNet in "
                                f"ImageFolder layout under '{src}' (train/ and val/ by WordNet id)")
            link = os.path.join(dst, split, wnid)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if os.path.islink(link):
                if os.readlink(link) == target:
                    continue
                os.remove(link)
            os.symlink(target, link)
            made += 1
    return made


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="data/imagenet", help="ImageNet root (train/, val/)")
    p.add_argument("--dst", default="data/imagenet100", help="where to create the subset")
    p.add_argument("--classes", default=CLASS_LIST, help="file with one WordNet id per line")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not os.path.isfile(args.classes):
        raise UserError(f"class list '{args.classes}' not found")
    made = make_subset(args.src, args.dst, read_classes(args.classes))
    logging.getLogger(__name__).info("made %d links under %s", made, args.dst)
    return made


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run_cli(main)
