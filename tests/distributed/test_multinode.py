"""Two nodes on one machine: launch/torchrun_multinode.sh started twice (NODE_RANK 0 and 1, one worker each), the
rendezvous on 127.0.0.1, running ``loom train`` on a tiny config with gloo on the CPU."""

from __future__ import annotations

import json
import re

import pytest
from harness import CHECKPOINT_EVERY, STEPS, checkpoints, scalars, trainer_state


@pytest.mark.distributed
def test_two_nodes_train_as_one_job(reference_run):
    run = reference_run
    out = "\n".join((run.logs / f"launcher{n}.out").read_text() for n in range(2))
    assert run.statuses == [0, 0], out[-4000:]

    # one job of two ranks, not two jobs of one: every checkpoint says world size 2 and holds both loaders
    assert checkpoints(run.stage_dir) == list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
    for step in checkpoints(run.stage_dir):
        assert trainer_state(run.stage_dir, step)["world_size"] == 2
        ckpt = run.stage_dir / "checkpoints" / f"step_{step:08d}"
        positions = [json.loads((ckpt / f"loader_rank{r}.json").read_text()) for r in (0, 1)]
        assert positions[0] != positions[1]  # each rank its own share of the data
    assert re.search(r"global batch .*× 2 data-parallel ranks", out)  # the trainer's start-up line
    assert (run.stage_dir / "export" / "model.safetensors").exists()
    losses = scalars(run.stage_dir / "logs" / "diffusion", "loss")
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))  # rank 0 alone logs, once per step

    # logs per node: each node's launcher log names its node, and the two workers are ranks 0 and 1
    seen = set()
    for node in (0, 1):
        text = (run.logs / f"node{node}.log").read_text()
        ranks = set(re.findall(rf"\[node{node} rank(\d)\]", text))
        assert len(ranks) == 1, ranks
        seen |= ranks
        worker_logs = list((run.logs / f"node{node}").rglob("stderr.log"))
        assert len(worker_logs) == 1 and "=== stage diffusion ===" in worker_logs[0].read_text()
    assert seen == {"0", "1"}
    assert out.count("resolved config written") == 1  # one writer of <run>/config.yaml, not one per rank
