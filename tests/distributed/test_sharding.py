"""Our DeepSpeed path through Accelerate, and the sharding helpers it rests on.

The DeepSpeed runs are real: ``sharding_worker.py`` trains the diffusion stage (DiT + frozen OpenCLIP tower) on
tiny image–caption shards with the real Trainer, in a process that Accelerate sets up for DeepSpeed ZeRO-2 or
ZeRO-3 from a JSON whose values are "auto" (one process, gloo, CPU). It runs 3 steps of 2 micro-batches with a NaN
loss in the second micro-batch of step 2, a warm-up learning rate, clipping and an EMA, then the same run split at a
checkpoint after step 2 and resumed. The same worker code runs here without any distribution as the reference.
``LATENTLOOM_SHARDING_DEVICE=cuda`` runs it all on one GPU with NCCL (``launch/gpu_check.sh``).
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
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import sharding_worker as worker  # noqa: E402
from sharding_launch import Ranks, base_env, sharding_device  # noqa: E402
from sharding_worker import deepspeed_json  # noqa: E402

from training.checkpoint import check_resumable, latest_checkpoint  # noqa: E402
from training.ema import EMA, ema_weights  # noqa: E402
from training.sharding import fill_deepspeed_config, materialize, meta_skeleton  # noqa: E402
from training.trainer import lr_lambda  # noqa: E402

STAGES = ("zero2", "zero3")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return worker.write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict:
    """ZeRO-2 and ZeRO-3 workers in parallel subprocesses, the reference in this process meanwhile."""
    root = tmp_path_factory.mktemp("deepspeed")
    started = {}
    for name in STAGES:
        cfg = root / f"{name}.json"
        cfg.write_text(json.dumps(deepspeed_json(int(name[-1]))))
        env = base_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(cfg)})
        started[name] = Ranks(Path(worker.__file__), [shards, root / name], 1, env, root / name / "logs")
    reference = {}
    for name in ("full", "head", "tail"):
        run_dir = root / "reference" / ("run_full" if name == "full" else "run_split")
        steps = worker.STEPS if name in ("full", "tail") else worker.CHECKPOINT
        first = 1 if name != "tail" else worker.CHECKPOINT * worker.GRAD_ACCUM + 1
        reference[name], _ = worker.train(shards, run_dir, steps, first, cpu=sharding_device() == "cpu")
    out = {"reference": reference, "root": root}
    for name, ranks in started.items():
        ranks.wait(timeout=240)
        out[name] = json.loads((root / name / "report_rank0.json").read_text())
    return out


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


def _final(run_dir: Path) -> tuple[dict, dict]:
    """(exported weights, the last checkpoint's EMA shadows) of a finished run."""
    export = load_file(str(run_dir / "export" / "model.safetensors"))
    ema = load_file(str(latest_checkpoint(run_dir) / "ema.safetensors"))
    return export, ema_weights(ema)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_trains_like_a_single_process(runs, stage):
    """Same losses, skipped step, learning rate, validation loss and EMA as the run without DeepSpeed: DeepSpeed's
    own accumulation, clipping and overflow skip behave like the trainer's."""
    ref, ds = runs["reference"]["full"], runs[stage]["full"]
    assert ref["strategy"] == "single" and ds["strategy"] == stage
    assert ds["step"] == ref["step"] == worker.STEPS
    assert ds["nonfinite"] == ref["nonfinite"] == 1.0
    assert len(ds["losses"]) == worker.STEPS * worker.GRAD_ACCUM
    assert math.isnan(ds["losses"][worker.POISONED_CALL - 1])
    finite = [i for i, x in enumerate(ref["losses"]) if not math.isnan(x)]
    torch.testing.assert_close(torch.tensor([ds["losses"][i] for i in finite]),
                               torch.tensor([ref["losses"][i] for i in finite]), rtol=1e-4, atol=1e-5)
    assert ds["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4)
    assert ref["grad_norm"] > worker.train_config(1).optim.max_grad_norm  # clipping is active in both
    assert ds["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)  # DeepSpeed's norm, DeepSpeed's clipping
    ref_export, ref_ema = _final(runs["root"] / "reference" / "run_full")
    ds_export, ds_ema = _final(runs["root"] / stage / "run_full")
    assert set(ds_export) == set(ref_export)
    for k in ref_ema:
        torch.testing.assert_close(ds_ema[k], ref_ema[k], rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_resume_continues_identically(runs, stage):
    """Stopped after step 2 (its sharded checkpoint) and resumed: the same losses, and bit-identical EMA and
    export, as the uninterrupted run."""
    r = runs[stage]
    assert r["head"]["step"] == worker.CHECKPOINT and r["tail"]["step"] == worker.STEPS
    assert _same(r["head"]["losses"] + r["tail"]["losses"], r["full"]["losses"])
    assert r["tail"]["nonfinite"] == 1.0  # the counter came back from the checkpoint
    assert r["tail"]["val_loss"] == r["full"]["val_loss"]
    full_export, full_ema = _final(runs["root"] / stage / "run_full")
    split_export, split_ema = _final(runs["root"] / stage / "run_split")
    for k in full_export:
        assert torch.equal(full_export[k], split_export[k]), k
    for k in full_ema:
        assert torch.equal(full_ema[k], split_ema[k]), k
    ckpt = latest_checkpoint(runs["root"] / stage / "run_split")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["strategy"] == stage and state["world_size"] == 1
    assert (ckpt / "pytorch_model").is_dir()  # DeepSpeed's own sharded state, through accelerator.save_state


@pytest.mark.distributed
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_export_is_the_consolidated_ema(runs, stage):
    """The exported weights are the EMA (gathered from the shards) for the trained parameters, and our gather of the
    live weights equals ``accelerator.get_state_dict`` (DeepSpeed's own consolidation under ZeRO-3)."""
    export, ema = _final(runs["root"] / stage / "run_full")
    assert set(ema) <= set(export)
    for k, v in ema.items():
        assert torch.equal(export[k], v.to(export[k].dtype)), k
    r = runs[stage]["full"]
    assert r["gather_keys_match"] and r["gather_max_diff"] == 0.0


@pytest.mark.distributed
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_optimizer_holds_only_the_trained_parameters(runs, stage):
    """The LR set each step reaches the torch optimizer inside DeepSpeed; the optimizer holds exactly the denoiser's
    parameters; ZeRO-3 leaves (0,) placeholders in the module; the frozen text encoder stays whole."""
    cfg = worker.train_config(worker.STEPS)
    assert runs[stage]["full"]["ds_config"] == {  # filled from the run config and the loader before prepare
        "train_micro_batch_size_per_gpu": worker.BATCH, "gradient_accumulation_steps": worker.GRAD_ACCUM,
        "train_batch_size": worker.BATCH * worker.GRAD_ACCUM, "gradient_clipping": cfg.optim.max_grad_norm}
    for name, steps in (("full", worker.STEPS), ("head", worker.CHECKPOINT)):
        r = runs[stage][name]
        expected = worker.LR * lr_lambda(cfg.optim, steps)(steps - 1)
        assert r["inner_optimizer"] == "AdamW"
        assert r["inner_lr"] == [pytest.approx(expected)]
        assert r["lr_logged"] == pytest.approx(expected)
    r = runs[stage]["full"]
    total = sum(math.prod(shape) for shape, _, _ in r["layout"].values())
    frozen = sum(math.prod(s) for s in r["frozen_shapes"].values())
    assert frozen > 1000
    assert 0 <= r["optimizer_numel"] - total < 32  # the denoiser only (ZeRO-1/2 pad their flat partition a little)
    for name, (shape, local, placeholder) in r["layout"].items():
        assert local == math.prod(shape), name  # one process: its partition is everything
        assert placeholder == (0 if stage == "zero3" else math.prod(shape)), name
    assert r["frozen_ds_attrs"] == []
    assert all(math.prod(s) > 0 for s in r["frozen_shapes"].values())


# ------------------------------------------------------------------------------------------- helpers, no DS


def test_fill_deepspeed_config_from_the_run_config():
    cfg = fill_deepspeed_config(deepspeed_json(3), micro_batch_size=4, grad_accum=2, world_size=8, max_grad_norm=0.5)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 4 * 2 * 8 and cfg["gradient_clipping"] == 0.5
    zero = cfg["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "reduce_bucket_size" not in zero and zero["stage3_param_persistence_threshold"] == 0
    assert "reduce_bucket_size" not in fill_deepspeed_config(
        dict(deepspeed_json(2), zero_optimization={"stage": 2, "reduce_bucket_size": "auto"}), 4, 1, 1, 1.0
    )["zero_optimization"]
    assert fill_deepspeed_config(deepspeed_json(2), 4, 1, 1, None)["gradient_clipping"] == 0.0
    explicit = dict(deepspeed_json(2), gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4.*train.grad_accum=2"):
        fill_deepspeed_config(explicit, 4, 2, 1, 1.0)
    with pytest.raises(ValueError, match="micro-batch size"):
        fill_deepspeed_config(deepspeed_json(2), None, 1, 1, 1.0)
    agreeing = dict(deepspeed_json(2), train_micro_batch_size_per_gpu=4, gradient_clipping=1.0)
    assert fill_deepspeed_config(agreeing, None, 1, 2, 1.0)["train_batch_size"] == 8


def test_check_resumable_refuses_foreign_shards(tmp_path):
    check_resumable({"strategy": "ddp", "world_size": 2}, "single", 1, tmp_path)  # whole weights: portable
    check_resumable({"strategy": "zero1", "world_size": 4}, "zero2", 4, tmp_path)  # same ZeRO-1/2 format
    check_resumable({"world_size": 1}, "ddp", 2, tmp_path)  # written before strategies were recorded
    with pytest.raises(ValueError, match="written under zero3 and cannot be resumed under ddp"):
        check_resumable({"strategy": "zero3", "world_size": 2}, "ddp", 2, tmp_path)
    with pytest.raises(ValueError, match="zero3 shards of 2 processes, this run has 4"):
        check_resumable({"strategy": "zero3", "world_size": 2}, "zero3", 4, tmp_path)


def test_eval_copy_from_a_meta_skeleton():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    net.register_buffer("scale", torch.tensor(2.0), persistent=False)
    skeleton = meta_skeleton(net)
    assert all(p.is_meta for p in skeleton.parameters()) and not any(p.is_meta for p in net.parameters())
    half = {k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}  # e.g. DeepSpeed's 16-bit consolidation
    copy_ = materialize(skeleton, half, "cpu")
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in copy_.parameters())
    assert torch.equal(copy_.scale, torch.tensor(2.0)) and not copy_.training
    for k, v in copy_.state_dict().items():
        assert torch.equal(v, half[k].float()), k
    with pytest.raises(RuntimeError, match="Missing key"):
        materialize(skeleton, {k: v for k, v in half.items() if k != "2.bias"}, "cpu")


def test_eval_copy_keeps_a_frozen_half_precision_base():
    """A frozen part held in bf16 (a LoRA base under cast_base or DeepSpeed's bf16) stays bf16 in the evaluation copy
    instead of doubling to fp32; the trained part comes back in its own (fp32) dtype."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    net[0].requires_grad_(False)
    skeleton = meta_skeleton(net)  # taken before the base is cast, as in Trainer.fit
    net[0].to(torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}  # e.g. a 16-bit consolidation
    copy_ = materialize(skeleton, state, "cpu")
    assert {n: p.dtype for n, p in copy_.named_parameters()} == {
        "0.weight": torch.bfloat16, "0.bias": torch.bfloat16, "1.weight": torch.float32, "1.bias": torch.float32}
    for k, v in copy_.state_dict().items():
        assert torch.equal(v.float(), state[k].float()), k


def test_ema_consolidated_form_without_sharding():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema = EMA(net.named_parameters(), decay=0.5, warmup=False)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    full = ema.full_state_dict()
    assert set(full) == set(ema.state_dict())
    for k, v in ema.state_dict().items():
        assert torch.equal(full[k], v)
    other = EMA(net.named_parameters(), decay=0.5, warmup=False)
    other.load_full_state_dict(full)
    assert other.num_updates == 1 and torch.equal(other.shadow["weight"], ema.shadow["weight"])
