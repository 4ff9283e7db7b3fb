"""The README's "Your own data and model" recipe, run as written (issue 33).

The four commands are read from README.md between the recipe markers and run as subprocesses
in a fresh folder holding a 32-px ImageFolder at ``data/mydata``, so every relative path of
the README resolves there. The only changes are the ones the README asks for: the counts
(--epochs, --train_episode, --train_size, --val_size) shrink to a tiny folder, and ``python
X.py`` / ``python -m`` run this checkout's scripts and modules.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import image_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- recipe:start -->", "<!-- recipe:end -->"
# the counts the README says to change, and this test's tiny values
TINY = {"--epochs": "1", "--train_episode": "2", "--train_size": "24", "--val_size": "12"}
CLASSES = ["a", "b", "c"]


def recipe_commands(readme):
    """The recipe's commands as argument lists (a trailing backslash continues a line)."""
    block = readme.split(START, 1)[1].split(END, 1)[0]
    lines = [line for line in block.splitlines() if not line.startswith("```")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


def tiny(argv):
    """``argv`` with the README's counts at TINY and this checkout's python and scripts."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in TINY:
            out[i + 1] = TINY[arg]
    assert out[0] == "python"
    out[0] = sys.executable
    if out[1].endswith(".py"):
        out[1] = os.path.join(ROOT, out[1])
    return out


def test_the_readme_holds_four_short_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        commands = recipe_commands(f.read())
    assert [c[1] for c in commands] == ["pretrain.py", "rl_quantize.py", "finetune.py", "-m"]
    flags = [{a for a in c if a.startswith("--")} for c in commands]
    # the checkpoint carries arch, width, input size and classes: no later command repeats them
    for repeated in ("--arch", "--width_mult", "--input_size", "--dataset", "--num_classes"):
        assert not any(repeated in f for f in flags[1:]), repeated
    assert all(k in flags[0] | flags[1] | flags[2] for k in TINY)


@pytest.mark.slow
def test_the_recipe_runs_from_an_image_folder_to_a_packed_file(tmp_path):
    image_tree(tmp_path / "data" / "mydata", {"train": CLASSES, "val": CLASSES}, per_class=12,
               size=32)
    with open(os.path.join(ROOT, "README.md")) as f:
        commands = [tiny(c) for c in recipe_commands(f.read())]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    runs = []
    for argv in commands:
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, (argv, r.stderr[-3000:])
        runs.append(r)

    search = tmp_path / "save" / "qmobilenetv2_mydata-run1"
    assert runs[1].stdout.strip() == os.path.join("save", "qmobilenetv2_mydata-run1",
                                                  "strategy.json")
    with open(search / "strategy.json") as f:
        strategy = json.load(f)
    assert (strategy["arch"], strategy["dataset"], strategy["input_size"], strategy["num_classes"],
            strategy["mode"], strategy["metric"]) == ("qmobilenetv2", "data/mydata", 32, 3,
                                                      "linear", "latency")
    assert strategy["preserve_ratio"] == 0.5 and strategy["min_bit"] == 2
    assert 0 < strategy["cost_ratio"] <= 0.5
    assert len(strategy["strategy"]) == len(strategy["layers"]) == 53
    assert strategy["layers"][0] == "features.0.0"          # named_modules() names

    ft = tmp_path / "checkpoints" / "qmobilenetv2_mydata_linear_finetune-run1"
    with open(ft / "results.json") as f:
        results = json.load(f)
    assert results["policy"] == strategy["strategy"]
    assert results["layer_names"] == strategy["layers"]
    assert results["model_kwargs"]["input_size"] == 32 and results["epochs"] == 1
    assert (results["cost_ratio"], results["preserve_ratio"]) == (strategy["cost_ratio"], 0.5)
    assert 0.0 <= results["best_top1"] <= 100.0

    packed = tmp_path / "mydata.haq"
    report = runs[3].stderr   # the size report is logged
    whole = re.search(r"whole file\s+([\d,]+)", report)
    assert whole and int(whole.group(1).replace(",", "")) == packed.stat().st_size
    weights = re.search(r"weights\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)", report)
    assert weights and weights.group(1) == weights.group(2)   # exactly the predicted size
