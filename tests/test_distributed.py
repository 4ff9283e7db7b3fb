"""torchrun (docs/design.md section 13): exact distributed validation counts and the search on 2 processes.

The fast tests spawn a 2-process gloo group with torch.multiprocessing; the slow
ones launch ``torchrun`` (``python -m torch.distributed.run``) on CPU.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from lib.utils.distributed import ShardSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_VAL = 7   # does not divide by 2: DistributedSampler would pad it to 8


def _tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def _validate(distributed):
    """Top-1 and the count of images scored on the first N_VAL mnist5k test images."""
    from lib.utils.data_utils import get_dataset
    from lib.utils.train import evaluate
    _, val_loader, _ = get_dataset("mnist5k", 4, 0, distributed=distributed, train_subset=N_VAL,
                                   val_batch_size=2)
    return evaluate(_tiny_classifier(), val_loader, nn.CrossEntropyLoss(), torch.device("cpu"),
                    progress=False)


def _validate_on_rank(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        stats = _validate(distributed=True)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(stats, f)
    finally:
        dist.destroy_process_group()


def test_shard_sampler_gives_each_index_to_one_rank():
    shards = [list(ShardSampler(range(11), rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert [len(ShardSampler(range(11), rank=r, world_size=3)) for r in range(3)] == [4, 4, 3]


def test_distributed_validation_counts_every_image_once(tmp_path):
    """Two gloo processes on 7 images: 7 scored in all, same top-1 as one process."""
    # fork: the children start at once, without importing torch again (CPU only, no CUDA)
    mp.start_processes(_validate_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = _validate(distributed=False)
    assert single["count"] == N_VAL
    for stats in ranks:
        assert stats["count"] == N_VAL
        assert stats["top1"] == single["top1"] and stats["top5"] == single["top5"]
        assert stats["loss"] == pytest.approx(single["loss"], rel=1e-6)


class _RecordingEvaluator:
    """Stands in for the fine-tune: keeps the quantized model and the sharer's codebooks."""

    def finetune(self, model, step_hook=None, scoring=None):
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.codebooks = getattr(getattr(step_hook, "__self__", None), "codebooks", None)
        return {"top1": 0.0, "top5": 0.0, "loss": 0.0, "nonfinite": False}

    def validate(self, model):
        return {"top1": 0.0, "top5": 0.0, "loss": 0.0}


def _quantize_on_rank(rank, world, init_file, out_dir, linear):
    """Apply one policy on this rank; the env's seed and calibration images differ per rank."""
    import numpy as np

    from lib.env import EnvConfig, KMeansQuantizeEnv, LinearQuantizeEnv
    from lib.simulator.costs import TableCost
    from models import get_model
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)    # the same pretrained weights on every rank
        model = get_model("qmobilenetv2" if linear else "mobilenetv2", num_classes=10,
                          input_size=32, width_mult=0.25)
        cfg = EnvConfig(preserve_ratio=1.0, min_bit=2, max_bit=8, input_size=32, seed=100 + rank)
        evaluator = _RecordingEvaluator()
        if linear:
            images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
            n = 53
            env = LinearQuantizeEnv(model, evaluator, cfg, TableCost(np.ones((n, 8, 8))), images,
                                    torch.device("cpu"))
            env.evaluate_policy([[8, -1]] + [[4, 3]] * (n - 2) + [[8, 8]])
        else:
            env = KMeansQuantizeEnv(model, evaluator, cfg)
            env.evaluate_policy([3] * len(env.layers))
            evaluator.state.update({f"{k}.labels": cb.labels for k, cb in
                                    evaluator.codebooks.items()})
        torch.save(evaluator.state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("linear", [False, True], ids=["kmeans", "linear"])
def test_quantization_runs_on_rank_0_and_ranks_agree(tmp_path, linear):
    """K-Means (own seed per rank) / calibration (own images per rank): rank 0's result everywhere."""
    mp.start_processes(_quantize_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path), linear),
                       nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    if linear:
        ranges = [k for k in r0 if k.endswith("activation_range")]
        assert ranges and any(float(r0[k]) != 6.0 for k in ranges)   # calibrated, not the init
    else:
        assert any(k.endswith(".labels") for k in r0)
        w = r0["features.2.conv.0.weight"]
        assert w.unique().numel() <= 8                                  # 3-bit K-Means


# --------------------------------------------------------------------------- slow: torchrun
def _run(args, cwd, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _free_port():
    """A port nothing listens on now (a fixed one may be taken by another job's torchrun)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun():
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port())]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained width-0.25 MobileNet-V2 (~88% top-1), so accuracies differ between policies."""
    out = str(tmp_path_factory.mktemp("pre") / "m.pth.tar")
    r = _run([sys.executable, "pretrain.py", "--width_mult", "0.25", "--train_subset", "2048",
              "--epochs", "3", "--output", out, "--no-progress", "--ema_decay", "0"], ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _search_args(ckpt, out, linear, finetune, episodes=3):
    args = ["rl_quantize.py", "--dataset", "mnist5k", "--width_mult", "0.25", "--pretrained_path",
            ckpt, "--train_size", "64", "--val_size", "37", "--data_bsize", "32", "--n_worker", "0",
            "--warmup", "2", "--train_episode", str(episodes), "--seed", "1", "--device", "cpu",
            "--output", str(out), "--finetune_flag", str(finetune), "--debug"]   # rank 1's lines
    if linear:
        return args + ["--linear_quantization", "--preserve_ratio", "0.5", "--min_bit", "2"]
    return args + ["--preserve_ratio", "0.25", "--min_bit", "3"]


def _log_rows(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1:] if line]
    return [(int(r[0]), float(r[2]), json.loads(r[6])) for r in rows]


def _one_run(out):
    runs = os.listdir(out)
    assert len(runs) == 1, runs     # one set of outputs, written by rank 0
    return os.path.join(out, runs[0])


def _follower_rows(stderr):
    """(policy, accuracy) of each episode as logged by rank 1 (with --debug only)."""
    found = re.findall(r"rank 1: policy (\[.*\]) accuracy ([0-9.]+)", stderr)
    return [(json.loads(p), float(a)) for p, a in found]


@pytest.mark.slow
@pytest.mark.parametrize("linear,method", [(False, "ddpg"), (True, "ddpg"), (False, "random")],
                         ids=["kmeans", "linear", "kmeans-random"])
def test_torchrun_search_scores_like_one_process(repo_root, tmp_path, trained, linear, method):
    """Fine-tuning off: 2 ranks (37 = 19 + 18 validation images) log exactly the 1-process search."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--method", method]
    r = _run([sys.executable] + _search_args(trained, one, linear, False) + extra, repo_root)
    assert r.returncode == 0, r.stderr[-2000:]
    r2 = _run(_torchrun() + _search_args(trained, two, linear, False) + extra, repo_root)
    assert r2.returncode == 0, r2.stderr[-3000:]
    rows1, rows2 = _log_rows(_one_run(one)), _log_rows(_one_run(two))
    assert rows2 == rows1                       # same policies, exactly the same accuracies
    assert len({acc for _, acc, _ in rows1}) > 1, "accuracies should differ between policies"
    assert _follower_rows(r2.stderr) == [(p, round(a, 4)) for _, a, p in rows2]
    assert r2.stdout.count("strategy.json") == 1


@pytest.mark.slow
def test_torchrun_search_finetunes_on_shards_and_resumes(repo_root, tmp_path, trained):
    """Fine-tuning on (DDP): the ranks agree every episode; a torchrun resume logs each episode once."""
    out = tmp_path / "ft"
    r = _run(_torchrun() + _search_args(trained, out, False, True, episodes=2), repo_root)
    assert r.returncode == 0, r.stderr[-3000:]
    folder = _one_run(out)
    rows = _log_rows(folder)
    assert [e for e, _, _ in rows] == [0, 1]
    assert _follower_rows(r.stderr) == [(p, round(a, 4)) for _, a, p in rows]
    r = _run(_torchrun() + _search_args(trained, out, False, True, episodes=3)
             + ["--resume_search", folder], repo_root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _one_run(out) == folder
    rows = _log_rows(folder)
    assert [e for e, _, _ in rows] == [0, 1, 2]
    assert _follower_rows(r.stderr) == [(p, round(a, 4)) for _, a, p in rows[2:]]
    for name in ("strategy.json", "agent.pth.tar", "search_state.pth.tar", "best_policy.png",
                 "accuracy_vs_cost.png"):
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    assert sum(f.startswith("events.out.tfevents") for f in os.listdir(folder)) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("linear,metric,refine", [(True, "loss", 0), (False, "hessian", 0),
                                                  (True, "loss", 30)],
                         ids=["linear-loss", "kmeans-hessian", "linear-loss-refine"])
def test_torchrun_ilp_scores_on_shards_like_one_process(repo_root, tmp_path, trained, linear,
                                                        metric, refine):
    """--method ilp under torchrun: every rank scores its shard of the validation subset (all
    37 images between them), so the scores, the planned policy and its accuracy are the
    1-process run's; rank 0 alone writes the score cache. With --refine the ranks measure
    their shards' losses together and take the same swaps as one process."""
    import numpy as np
    extra = ["--method", "ilp", "--sensitivity", metric, "--sensitivity_images", "37",
             "--hessian_iters", "4", "--refine", str(refine)]
    one, two = tmp_path / "one", tmp_path / "two"
    r = _run([sys.executable] + _search_args(trained, one, linear, False) + extra, repo_root)
    assert r.returncode == 0, r.stderr[-2000:]
    r2 = _run(_torchrun() + _search_args(trained, two, linear, False) + extra, repo_root)
    assert r2.returncode == 0, r2.stderr[-3000:]
    rows1, rows2 = _log_rows(_one_run(one)), _log_rows(_one_run(two))
    assert len(rows1) == 1 and rows2 == rows1          # the same planned policy and accuracy
    assert _follower_rows(r2.stderr) == [(p, round(a, 4)) for _, a, p in rows2]
    with open(os.path.join(_one_run(one), "sensitivity.json")) as f1, \
            open(os.path.join(_one_run(two), "sensitivity.json")) as f2:
        s1, s2 = json.load(f1), json.load(f2)
    for kind in ("weight", "activation") if linear else ("weight",):
        assert np.allclose(s1[kind], s2[kind], rtol=1e-4, atol=1e-6), kind
