"""Reading what a run left in its folder: the episode log and the newest run of a kind."""
import os

from lib.utils.errors import UserError

MODES = ("linear", "kmeans")


def read_log(path):
    """Episode rows of a search's log.txt (header: episode reward accuracy cost_ratio ...)."""
    rows = []
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        for line in f:
            cells = dict(zip(header, line.rstrip("\n").split("\t")))
            rows.append({k: float(cells[k]) for k in ("episode", "reward", "accuracy", "cost_ratio")})
    return rows


def newest_run(parent, holding):
    """The newest run folder under ``parent`` that holds the file ``holding``."""
    runs = sorted((os.path.join(parent, d) for d in os.listdir(parent)), key=os.path.getmtime) \
        if os.path.isdir(parent) else []
    runs = [r for r in runs if os.path.isfile(os.path.join(r, holding))]
    if not runs:
        raise UserError(f"no search with a {holding} under '{parent}'")
    return runs[-1]


def find_search(demo_dir, mode):
    """The newest run folder under DEMO_DIR/<mode>_search that holds a strategy.json."""
    return newest_run(os.path.join(demo_dir, f"{mode}_search"), "strategy.json")
