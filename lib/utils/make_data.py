"""Build data/imagenet100 from data/imagenet with one symlink per class.

    python -m lib.utils.make_data [--src data/imagenet] [--dst data/imagenet100]

The 100 WordNet ids are in lib/utils/imagenet100.txt; both train/ and val/ must be
in ImageFolder layout (val/ sorted into class folders). An existing --dst is refused
unless it holds only links an earlier run with the same --src and class list made.
"""
import argparse
import logging
import os
import re
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lib.utils.cli import ArgumentParser, check_output_dir  # noqa: E402
from lib.utils.errors import UserError, run_cli  # noqa: E402

CLASS_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet100.txt")


WNID = re.compile(r"n\d{8}")


def read_classes(path=CLASS_LIST):
    """The WordNet ids listed in ``path`` (one per line); UserError for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            classes = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"class list '{path}' could not be read ({type(exc).__name__}); "
                        "expected a text file with one WordNet id per line") from exc
    bad = [c for c in classes if not WNID.fullmatch(c)]
    if bad or not classes:
        first = bad[0] if bad else ""
        shown = first if len(first) <= 40 else first[:40] + "..."   # one readable line
        got = f"'{shown}'" if bad else "no ids"
        raise UserError(f"class list '{path}' holds {got}; expected one WordNet id (n + 8 "
                        "digits, e.g. n01440764) per line")
    if len(set(classes)) != len(classes):
        dup = next(c for c in classes if classes.count(c) > 1)
        raise UserError(f"class list '{path}' lists '{dup}' twice; expected each id once")
    return classes


def check_paths(src, dst):
    """The source must be a dataset folder and the destination a different, creatable folder."""
    if not os.path.isdir(src):
        raise UserError(f"--src '{src}' is not a folder; expected ImageNet in ImageFolder layout "
                        "(train/ and val/ by WordNet id)")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_src == real_dst:
        raise UserError(f"--dst '{dst}' is --src; expected a different folder for the subset")
    # a subset inside the source would add a class folder to its train/ or val/ (and the
    # reverse would link the source into itself)
    if os.path.commonpath([real_src, real_dst]) in (real_src, real_dst):
        raise UserError(f"--dst '{dst}' and --src '{src}' lie one inside the other; expected "
                        "separate folders (the subset must not change the source dataset)")
    check_output_dir(dst, "--dst")
    for split in ("train", "val"):
        check_output_dir(os.path.join(dst, split), "--dst")


def _planned_links(src, dst, classes):
    """[(target, link)] of every class and split; UserError before any link is made."""
    plan = []
    for split in ("train", "val"):
        for wnid in classes:
            target = os.path.abspath(os.path.join(src, split, wnid))
            if not os.path.isdir(target):
                raise UserError(f"class folder '{target}' not found; expected ImageNet in "
                                f"ImageFolder layout under '{src}' (train/ and val/ by WordNet id)")
            plan.append((target, os.path.join(dst, split, wnid)))
    return plan


def _foreign_entries(dst, plan):
    """Paths under ``dst`` that this run would not make, sorted.

    Only the folders train/ and val/ and, inside them, links to this run's class folders
    may be there already (an earlier run with the same --src and class list, finished or
    not). Anything else is someone's: a file, a link of the user's own, or a link left by a
    run with another class list, which would stay in the subset as an extra class.
    """
    wanted = {link: os.path.realpath(target) for target, link in plan}
    if not os.path.isdir(dst):
        return []
    foreign = []
    for name in sorted(os.listdir(dst)):
        split = os.path.join(dst, name)
        if name not in ("train", "val") or os.path.islink(split) or not os.path.isdir(split):
            foreign.append(split)
            continue
        for entry in sorted(os.listdir(split)):
            link = os.path.join(split, entry)
            if not (os.path.islink(link) and os.path.realpath(link) == wanted.get(link)):
                foreign.append(link)
    return foreign


def make_subset(src, dst, classes):
    """Symlink ``src/{train,val}/<wnid>`` to ``dst/{train,val}/<wnid>``; returns links made.

    Every class folder is checked first, so a missing one leaves no half-made subset. An
    existing ``dst`` is completed only when it holds nothing but this run's own links;
    otherwise it is refused whole, so no link or file of the user's is ever replaced.
    """
    plan = _planned_links(src, dst, classes)
    foreign = _foreign_entries(dst, plan)
    if foreign:
        more = f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""
        raise UserError(f"--dst '{dst}' holds {len(foreign)} path(s) this run would not make: "
                        f"{', '.join(foreign[:3])}{more}; refused, nothing changed; expected an "
                        "empty --dst or one made from the same --src and class list")
    made = 0
    for target, link in plan:
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.islink(link):   # else it is already this run's link (checked above)
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
    classes = read_classes(args.classes)
    check_paths(args.src, args.dst)
    made = make_subset(args.src, args.dst, classes)
    logging.getLogger(__name__).info("made %d links under %s", made, args.dst)
    return made


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run_cli(main)
