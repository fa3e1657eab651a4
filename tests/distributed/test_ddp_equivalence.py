"""Two processes × batch b train exactly like one process × batch 2b, and ``accelerate launch`` with
launch/accelerate/ddp_cpu_gloo.yaml really starts two processes.

Why the data lines up: the loader splits data over ranks. With a single shard, fewer shards than the two ranks, it
splits by sample instead: rank r keeps samples r, r+2, r+4, ... of the shard (no shuffling, in order). One process
with batch 2b reads samples 0..2b-1 at its first step; rank 0 and rank 1 with batch b read 0, 2, ..., 2b-2 and
1, 3, ..., 2b-1: the same 2b images, at every step. The test checks this from the keys each rank actually trained
on, then compares the loss and the gradient norm of every step and the final weights. The stage is deterministic
(MSE of a small pixel autoencoder), so only float summation order separates the two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import CPU_GLOO_CONFIG, REPO, launch_env, scalars
from safetensors.torch import load_file

sys.path.insert(0, str(REPO / "tests" / "data"))
from shardmaker import make_shards  # noqa: E402

SCRIPT = Path(__file__).with_name("equivalence_script.py")
B = 4


def _run_all(cmds: list[list[str]], logs: list[Path]) -> None:
    """Run the commands side by side (their start-up dominates); each must succeed."""
    files = [open(log, "w") for log in logs]
    procs = [subprocess.Popen(c, env=launch_env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
             for c, f in zip(cmds, files)]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p, f in zip(procs, files):
            if p.poll() is None:
                p.kill()
            f.close()
    for code, log in zip(codes, logs):
        assert code == 0, log.read_text()[-4000:]


@pytest.mark.distributed
def test_two_processes_batch_b_equal_one_process_batch_2b(tmp_path):
    from equivalence_script import STEPS, PixelAutoencoder

    make_shards(tmp_path / "shards", n_shards=1, per_shard=16 * B, size=lambda i: (8, 8))
    shards = str(tmp_path / "shards")
    one, two = tmp_path / "one", tmp_path / "two"
    _run_all([[sys.executable, str(SCRIPT), shards, str(one), str(2 * B)],
              [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_GLOO_CONFIG),
               str(SCRIPT), shards, str(two), str(B)]],
             [tmp_path / "one.log", tmp_path / "two.log"])

    # two ranks really ran (`accelerate launch --cpu --num_processes 2` would have run one)
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    single = json.loads((one / "rank0.json").read_text())
    assert (single["rank"], single["world"]) == (0, 1)
    assert not list(two.glob("rank2.json"))

    # the same images at every step: the ranks' halves are disjoint and together make the single process's batch
    assert len(single["keys"]) == len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == STEPS
    for step in range(STEPS):
        k0, k1, k = ranks[0]["keys"][step], ranks[1]["keys"][step], single["keys"][step]
        assert len(k0) == len(k1) == B and len(k) == 2 * B
        assert not set(k0) & set(k1) and set(k0) | set(k1) == set(k), step

    # the loss (mean over ranks of each rank's mean) and the gradient norm after the all-reduce, step by step
    for tag in ("loss", "grad_norm"):
        a = scalars(one / "logs" / "pixels", tag)
        b = scalars(two / "logs" / "pixels", tag)
        assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1)), tag
        torch.testing.assert_close(torch.tensor([v for _, v in b]), torch.tensor([v for _, v in a]),
                                   rtol=1e-5, atol=1e-7, msg=tag)

    w1 = load_file(str(one / "export" / "model.safetensors"))
    w2 = load_file(str(two / "export" / "model.safetensors"))
    init = PixelAutoencoder().model.state_dict()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6, msg=k)
        assert (w1[k] - init[k]).abs().max() > 1e-3, k  # the weights did move, far beyond the tolerance
    assert os.path.exists(two / "logs" / "pixels") and not list((two / "logs").glob("*rank1*"))
