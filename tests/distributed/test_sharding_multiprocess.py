"""Sharding across two real ranks (gloo, CPU): DeepSpeed ZeRO-3 through Accelerate and the real Trainer, FSDP2 driven
directly, and rank 0 working longer than the collective timeout while the other rank waits. FSDP2 and the wait run on
the CPU (gloo) in every mode; ZeRO-3 uses one GPU per rank under ``LATENTLOOM_SHARDING_DEVICE=cuda``."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))

import sharding_worker as worker  # noqa: E402
from sharding_launch import base_env, run_ranks, sharding_device  # noqa: E402
from sharding_worker import deepspeed_json  # noqa: E402

from training.checkpoint import latest_checkpoint  # noqa: E402
from training.ema import ema_weights  # noqa: E402

HERE = Path(__file__).resolve().parent


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


@pytest.mark.slow  # ~30 s: two ranks importing DeepSpeed and open_clip, three trainings each
@pytest.mark.distributed
@pytest.mark.skipif(sharding_device() == "cuda" and torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank")
def test_zero3_on_two_ranks_partitions_resumes_and_consolidates(tmp_path):
    """The diffusion stage under ZeRO-3 over 2 processes: every parameter split in two (the last partition padded),
    each rank's optimizer holds half, the frozen text encoder stays whole, resume is exact on both ranks, and the
    exported weights are the EMA gathered from both ranks' shards."""
    shards = worker.write_shards(tmp_path / "shards")
    cfg = tmp_path / "zero3.json"
    cfg.write_text(json.dumps(deepspeed_json(3)))
    env = base_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(cfg)})
    out = tmp_path / "out"
    logs = run_ranks(HERE / "sharding_worker.py", [shards, out], 2, env, timeout=300, log_dir=out / "logs")
    reports = [json.loads((out / f"report_rank{r}.json").read_text()) for r in range(2)]

    total = 0
    for rank, rep in enumerate(reports):
        full = rep["full"]
        assert (full["rank"], full["world"], full["strategy"]) == (rank, 2, "zero3")
        for name, (shape, local, placeholder) in full["layout"].items():
            n = math.prod(shape)
            assert local == math.ceil(n / 2) and placeholder == 0, name
        total = sum(math.prod(s) for s, _, _ in full["layout"].values())
        assert full["layout"]["final_layer.linear.bias"][:2] == [[3], 2]  # 3 elements: 2 + (1 + 1 padding)
        assert total / 2 <= full["optimizer_numel"] < total / 2 + 64
        assert full["frozen_ds_attrs"] == [] and all(math.prod(s) > 0 for s in full["frozen_shapes"].values())
        assert _same(rep["head"]["losses"] + rep["tail"]["losses"], full["losses"])
        assert math.isnan(full["losses"][worker.POISONED_CALL - 1]) and full["nonfinite"] == 1.0
        pad = rep["padding"]  # DeepSpeed driven directly: Linear(3, 5) over 2 ranks, known weights
        assert pad["shard_numel"] == {"weight": [8, 15, 0], "bias": [3, 5, 0]}
        assert pad["gather_ok"] and pad["shard_of_ok"] and pad["ema_ok"]
    assert reports[0]["full"]["losses"][:2] != reports[1]["full"]["losses"][:2]  # each rank its own data
    assert reports[0]["full"]["gather_max_diff"] == 0.0 and reports[0]["full"]["gather_keys_match"]
    assert reports[0]["full"]["val_loss"] == reports[0]["tail"]["val_loss"]
    assert reports[1]["full"]["val_loss"] is None  # validation runs on rank 0 only
    assert reports[0]["full"]["ds_config"]["train_batch_size"] == worker.BATCH * worker.GRAD_ACCUM * 2
    # rank-0-only log lines: the start-up line stating the global batch, the skipped-step warning
    start = "global batch 16 = micro-batch 4 × 2 accumulation × 2 data-parallel ranks"
    assert logs[0].count(start) == 3 and start not in logs[1]
    assert logs[0].count("non-finite loss on some rank") == 2 and "non-finite loss" not in logs[1]

    finals = {}
    for run in ("run_full", "run_split"):
        ckpt = latest_checkpoint(out / run)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["strategy"] == "zero3" and state["world_size"] == 2
        assert (ckpt / "loader_rank0.json").exists() and (ckpt / "loader_rank1.json").exists()
        optim = sorted(p.name for p in (ckpt / "pytorch_model").glob("*optim_states.pt"))
        assert len(optim) == 2, optim  # one optimizer partition per rank
        ema = ema_weights(load_file(str(ckpt / "ema.safetensors")))
        export = load_file(str(out / run / "export" / "model.safetensors"))
        for name, (shape, _, _) in reports[0]["full"]["layout"].items():
            assert tuple(ema[name].shape) == tuple(shape) and torch.equal(export[name], ema[name]), name
        finals[run] = export
    for k in finals["run_full"]:
        assert torch.equal(finals["run_full"][k], finals["run_split"][k]), k


@pytest.mark.distributed
def test_fsdp2_shards_ema_and_eval_copy_on_two_ranks(tmp_path):
    """FSDP2 (fully_shard) over 2 ranks: our gather equals torch's full state dict and an unsharded twin, the EMA of
    the shards consolidates to the twin's EMA, whole → part and part → whole → part round trips are exact, and the
    evaluation copy built from the consolidated weights computes what the twin computes."""
    report = tmp_path / "fsdp2.json"
    run_ranks(HERE / "fsdp2_worker.py", [report], 2, base_env(device="cpu"), timeout=180, log_dir=tmp_path / "logs")
    r = json.loads(report.read_text())
    assert r["world"] == 2
    assert r["split"]["final_layer.linear.weight"] == [2, 3]  # 3 rows: 2 on rank 0, 1 on rank 1
    assert r["split"]["x_embedder.weight"] == [16, 32]
    assert r["all_ranks_own_part_ok"] and r["all_ranks_round_trip_ok"]
    assert r["gather_vs_torch_full_state_dict"] == 0.0
    assert r["gather_vs_unsharded_model"] < 1e-5
    assert r["ema_vs_unsharded_ema"] < 1e-5 and r["ema_num_updates"] == 3
    assert r["eval_copy_vs_unsharded_output"] < 1e-5
    assert r["eval_copy_dtype"] == "torch.float32" and not r["eval_copy_requires_grad"]


@pytest.mark.distributed
def test_main_process_work_outlasts_the_collective_timeout(tmp_path):
    """``wait_for_main_process`` (the cache stage's wait): rank 0 works 3 s, the process group times out after 1 s,
    rank 1 still waits it out, and the default group works afterwards."""
    outputs = run_ranks(HERE / "wait_worker.py", [], 2, base_env(device="cpu"), timeout=90, log_dir=tmp_path / "logs")
    lines = [json.loads(o.strip().splitlines()[-1]) for o in outputs]
    assert [x["rank"] for x in lines] == [0, 1]
    assert lines[0]["result"] == "encoded" and lines[1]["result"] is None
    assert lines[1]["waited_s"] >= 2.5  # longer than the 1 s collective timeout
    assert all(x["sum"] == 3.0 for x in lines)
