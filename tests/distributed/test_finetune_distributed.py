"""LoRA and Diffusion-DPO under DDP (two processes, gloo) and under DeepSpeed ZeRO-2 through Accelerate.

``finetune_worker.py`` trains both stages with the real Trainer, peft adapters and the DPO reference = adapters
disabled, on fixed global batches split over the ranks with per-sample noise keyed by the sample (see its
docstring). Runs, side by side:

* ``single``: one plain process (the reference);
* ``ddp``: two ranks, each with half of every global batch (CPU only: NCCL cannot put two ranks on one GPU);
* ``zero2``: one process that Accelerate hands to DeepSpeed ZeRO-2 from a JSON of "auto" values, once straight
  through and once stopped at its checkpoint and resumed;
* ``zero2_bf16``: the same under DeepSpeed's bf16 mode (weights cast by the engine, fp32 master copies of the
  adapters; on the CPU here, on a GPU with ``LATENTLOOM_SHARDING_DEVICE=cuda`` from ``launch/gpu_check.sh``).
"""

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

import finetune_worker as worker  # noqa: E402
from sharding_launch import Ranks, base_env, sharding_device  # noqa: E402
from sharding_worker import deepspeed_json  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune")
    ds_json = root / "zero2.json"
    ds_json.write_text(json.dumps(deepspeed_json(2)))
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json)}
    plan = {"single": (1, {}, "full", "no"), "zero2": (1, deepspeed, "full,head,tail", "no"),
            "zero2_bf16": (1, deepspeed, "full", "bf16")}
    if sharding_device() == "cpu":
        plan["ddp"] = (2, {}, "full", "no")
    started = {}
    for name, (world, env, scenarios, precision) in plan.items():
        args = [root / name, scenarios, precision]
        # "single": no launcher at all, no RANK/WORLD_SIZE in the environment
        started[name] = Ranks(Path(worker.__file__), args, world, base_env(env), root / name / "logs",
                              launched=name != "single")
    out: dict = {"root": root}
    for name, ranks in started.items():
        ranks.wait(timeout=300)
        world, _, scenarios, _ = plan[name]
        out[name] = {(stage, scenario): [json.loads((root / name / f"{stage}_{scenario}_rank{r}.json").read_text())
                                         for r in range(world)]
                     for stage in worker.STAGES for scenario in scenarios.split(",")}
    return out


def _adapter(root: Path, run: str, stage: str, split: bool = False) -> dict[str, torch.Tensor]:
    return load_file(str(root / run / f"{stage}_{'split' if split else 'full'}" / "export" / "adapter.safetensors"))


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("stage", worker.STAGES)
def test_reference_run_trains_only_the_adapters(runs, stage):
    (r,) = runs["single"][(stage, "full")]
    assert (r["strategy"], r["world"], r["step"]) == ("single", 1, worker.STEPS)
    assert r["trainable"] and all(".lora_" in n for n in r["trainable"])
    assert r["optimizer_numel"] == r["trainable_numel"]
    assert r["base_keys_match"] and r["base_unchanged"] is True
    assert r["adapter_digest"] != r["adapter_digest_initial"]
    assert len(r["losses"]) == worker.STEPS * worker.GRAD_ACCUM and all(math.isfinite(x) for x in r["losses"])


@pytest.mark.parametrize("stage", worker.STAGES)
def test_two_ddp_ranks_with_half_batches_train_like_one_process(runs, stage):
    """Two ranks × b samples: the mean of the two ranks' losses is the single process's loss (2b) at every
    micro-batch, both ranks hold the same adapters after every all-reduce, and the exported (EMA) adapters match."""
    if "ddp" not in runs:
        pytest.skip("two ranks on one GPU: NCCL refuses; DDP runs in the CPU suite")
    (single,) = runs["single"][(stage, "full")]
    ranks = runs["ddp"][(stage, "full")]
    assert [(r["rank"], r["world"], r["strategy"]) for r in ranks] == [(0, 2, "ddp"), (1, 2, "ddp")]
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert len(mean) == len(single["losses"])
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    assert ranks[0]["losses"] != ranks[1]["losses"]  # the ranks did see different samples
    assert ranks[0]["adapter_digest"] == ranks[1]["adapter_digest"]
    assert all(r["base_unchanged"] is True for r in ranks)
    assert ranks[0]["export"] and ranks[1]["export"] is None  # rank 0 alone writes files
    # Adam divides by the root of tiny second moments, so float summation order (two halves all-reduced, against
    # one sum) shows at ~1e-5 in a few near-zero-gradient entries; the adapters moved ~1e-2, a thousand times more
    ddp, ref = _adapter(runs["root"], "ddp", stage), _adapter(runs["root"], "single", stage)
    _close(ddp, ref, atol=1e-4)
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 1e-2


@pytest.mark.parametrize("stage", worker.STAGES)
def test_zero2_trains_like_a_single_process_and_resumes(runs, stage):
    """DeepSpeed ZeRO-2 (its own accumulation, clipping, fp32 partition of the adapters only): the single
    process's losses and exported adapters; stopped at the checkpoint and resumed, the same again."""
    (single,) = runs["single"][(stage, "full")]
    (full,) = runs["zero2"][(stage, "full")]
    (head,) = runs["zero2"][(stage, "head")]
    (tail,) = runs["zero2"][(stage, "tail")]
    assert full["strategy"] == "zero2" and full["step"] == tail["step"] == worker.STEPS
    assert head["step"] == worker.CHECKPOINT
    tol = 1e-6 if sharding_device() == "cpu" else 1e-4  # CUDA: DeepSpeed's flat buffers may sum in another order
    torch.testing.assert_close(torch.tensor(full["losses"]), torch.tensor(single["losses"]), rtol=tol, atol=tol)
    # the optimizer's flat fp32 partition holds the adapters only (ZeRO pads it a little), not the frozen base
    assert 0 <= full["optimizer_numel"] - full["trainable_numel"] < 32
    assert full["trainable_numel"] == single["trainable_numel"]
    assert full["base_unchanged"] is True and tail["base_unchanged"] is True
    _close(_adapter(runs["root"], "zero2", stage), _adapter(runs["root"], "single", stage), atol=tol)
    assert head["losses"] + tail["losses"] == full["losses"]
    _close(_adapter(runs["root"], "zero2", stage, split=True), _adapter(runs["root"], "zero2", stage), atol=0.0)
    split_ckpt = runs["root"] / "zero2" / f"{stage}_split" / "checkpoints"
    assert sorted(p.name for p in split_ckpt.iterdir()) == ["step_00000002", "step_00000004"]


@pytest.mark.parametrize("stage", worker.STAGES)
def test_zero2_bf16(runs, stage):
    """bf16 under ZeRO-2: finite losses near the fp32 run's at the start, the base bit-identical to its bf16
    rounding (and verified so by the stage at export), the adapters trained."""
    (r,) = runs["zero2_bf16"][(stage, "full")]
    (single,) = runs["single"][(stage, "full")]
    assert r["strategy"] == "zero2" and r["step"] == worker.STEPS
    assert all(math.isfinite(x) for x in r["losses"])
    torch.testing.assert_close(torch.tensor(r["losses"][:2]), torch.tensor(single["losses"][:2]), rtol=0.05,
                               atol=0.05 if stage == "lora" else 0.2)
    assert r["base_unchanged_bf16"] is True
    assert r["adapter_digest"] != r["adapter_digest_initial"]
    meta = json.loads((runs["root"] / "zero2_bf16" / f"{stage}_full" / "export" / "adapter.json").read_text())
    assert meta["base_unchanged_verified"] is True
