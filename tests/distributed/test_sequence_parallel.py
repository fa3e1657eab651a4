"""Ulysses sequence parallelism (``training/sequence_parallel.py``, ``parallel.sequence_parallel``).

* ``sequence_parallel_worker.py`` on 2 and 4 gloo ranks: the video DiT split over the ranks gives the one-process
  outputs, loss and gradients (float64, tolerance 1e-9 relative to the largest value), for token counts that divide
  by the group and for counts that do not (padded, padded keys masked); with 4 ranks also 2 sequence-parallel × 2
  data-parallel ranks;
* ``loom train`` with ``parallel.sequence_parallel: 2`` on two ranks trains step for step like one process (same
  data, noise and timesteps on both ranks of the group; the gradient averaged by DDP is the whole one);
* configs that cannot be split are refused before any work, naming the key and the value.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from sharding_launch import base_env, run_ranks  # noqa: E402

from models.dit import DiT, DiTConfig  # noqa: E402
from models.registry import resolve  # noqa: E402
from models.unet import tiny_unet_config  # noqa: E402
from training.config_io import ConfigError, from_dict  # noqa: E402
from training.run_config import RunConfig  # noqa: E402
from training.sequence_parallel import (  # noqa: E402
    ParallelConfig,
    attach_sequence_parallel,
    check_model_config,
    data_parallel_position,
)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "sequence_parallel_worker.py"
TOL = 1e-9  # float64 throughout: only summation order separates the split model from the whole one


def _reports(tmp_path: Path, world: int) -> list[dict]:
    run_ranks(WORKER, [tmp_path], world, base_env(device="cpu"), timeout=240, log_dir=tmp_path / "logs")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _check(reports: list[dict], expected_cases: set[str]) -> None:
    for report in reports:
        cases = report["cases"]
        assert set(cases) == expected_cases
        for name, case in cases.items():
            if "/detached/" in name:  # detached again: the model runs whole on each rank
                assert case["out_dev"] == 0.0, name
                continue
            assert case["out_max"] > 1.0 and case["grad_max"] > 1.0, name  # random weights: nothing trivially zero
            assert case["grads_nonzero"] == case["n_params"], name  # every parameter has a gradient to compare
            assert case["out_dev"] <= TOL * case["out_max"], (name, case)
            assert case["loss_dev"] <= TOL, (name, case)
            assert case["grad_dev"] <= TOL * case["grad_max"], (name, case)
            assert len(set(case["group_losses"])) == 1, (name, case)  # the same loss on every rank of the group
            sp = int(name.split("/sp")[1][0])
            if "/padded/" in name:  # 3·3·3 = 27 tokens: padded to the next multiple of the group
                assert case["tokens"] == 27 and case["padded"] == -(-27 // sp) * sp, (name, case)
            else:
                assert case["tokens"] == case["padded"] == 80, (name, case)
            assert case["local_tokens"] == case["padded"] // sp, (name, case)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_ranks_give_the_one_process_outputs_and_gradients(tmp_path):
    reports = _reports(tmp_path, 2)
    _check(reports, {f"{m}/{s}/sp2" for m in ("wan", "latte_full") for s in ("divisible", "padded", "detached")})


@pytest.mark.distributed
@pytest.mark.slow  # 4 processes / a whole `loom train` pair: make test-slow
@pytest.mark.timeout(300)
def test_four_ranks_and_two_by_two_give_the_one_process_outputs_and_gradients(tmp_path):
    reports = _reports(tmp_path, 4)
    expected = {f"{m}/{s}/sp4" for m in ("wan", "latte_full") for s in ("divisible", "padded", "detached")}
    expected |= {f"{m}/{s}/sp2x2dp" for m in ("wan", "latte_full") for s in ("divisible", "padded")}
    expected |= {f"{m}/detached/sp2" for m in ("wan", "latte_full")}
    _check(reports, expected)
    # 2 × 2: the two data-parallel pairs trained on different clips, so their losses differ
    pairs = {r["rank"] // 2: r["cases"]["wan/divisible/sp2x2dp"]["group_losses"][0] for r in reports}
    assert pairs[0] != pairs[1]


@pytest.mark.distributed
@pytest.mark.slow  # 4 processes / a whole `loom train` pair: make test-slow
@pytest.mark.timeout(300)
def test_loom_train_with_sequence_parallel_two_trains_like_one_process(demo_shards, tmp_path):
    steps = 4
    configs = {}
    for name, sp in (("single", 1), ("sp2", 2)):
        path = harness.tiny_config(tmp_path / f"{name}.yaml", demo_shards, tmp_path / "runs", name=name,
                                   max_steps=steps, checkpoint_every=steps)
        cfg = yaml.safe_load(path.read_text())
        cfg["parallel"] = {"sequence_parallel": sp}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        configs[name] = path
    loom = [sys.executable, "-m", "launch", "train", "--config"]
    procs = [harness.start([*loom, str(configs["single"])], harness.launch_env(), tmp_path / "single.out"),
             harness.start(["torchrun", "--nproc_per_node=2", f"--master_port={harness.free_port()}", "-m", "launch",
                            "train", "--config", str(configs["sp2"])], harness.launch_env(), tmp_path / "sp2.out")]
    statuses = [harness.finish(p, timeout=240) for p in procs]
    assert statuses == [0, 0], [(tmp_path / f"{n}.out").read_text()[-4000:] for n in ("single", "sp2")]

    runs = {name: tmp_path / "runs" / name / "diffusion" for name in configs}
    log = (tmp_path / "sp2.out").read_text()
    assert "global batch 8 = micro-batch 8 × 1 accumulation × 1 data-parallel ranks" in log, log[-3000:]
    for tag in ("loss", "grad_norm"):
        a = harness.scalars(runs["single"] / "logs" / "diffusion", tag)
        b = harness.scalars(runs["sp2"] / "logs" / "diffusion", tag)
        assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, steps + 1)), tag
        torch.testing.assert_close(torch.tensor([v for _, v in b]), torch.tensor([v for _, v in a]),
                                   rtol=1e-5, atol=1e-6, msg=tag)
    one, split = harness.final_weights(runs["single"]), harness.final_weights(runs["sp2"])
    for kind in ("export", "live"):
        assert one[kind].keys() == split[kind].keys()
        moved = 0.0
        for k, v in one[kind].items():
            torch.testing.assert_close(split[kind][k], v, rtol=1e-5, atol=1e-6, msg=f"{kind} {k}")
            moved = max(moved, float((v - split[kind][k]).abs().max()))
        assert moved < 1e-5


# ------------------------------------------------------------------------------- refusals (no processes)


def test_unsplittable_models_are_refused_naming_the_key():
    _, latte = resolve("latte-tiny")
    with pytest.raises(ValueError, match=r"parallel.sequence_parallel=2: .*attention_layout='factorised'"):
        check_model_config(latte, 2)
    _, wan = resolve("wan-tiny")  # 2 heads
    with pytest.raises(ValueError, match=r"parallel.sequence_parallel=4: .*num_heads=2 is not divisible"):
        check_model_config(wan, 4)
    check_model_config(wan, 2)  # 2 heads over 2 ranks: fine
    with pytest.raises(ValueError, match=r"splits a DiT's tokens; the denoiser is a UNetConfig"):
        check_model_config(tiny_unet_config(), 2)
    with pytest.raises(ValueError, match="contains no DiT"):
        attach_sequence_parallel(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match=r"num_heads=2 is not divisible"):  # checked before any process group
        attach_sequence_parallel(DiT(DiTConfig(sample_size=4, hidden_size=16, depth=1, num_heads=2)), 4)


def test_run_config_refuses_before_any_work():
    base = {"pipeline": ["diffusion"], "diffusion": {"denoiser": "latte-tiny"}, "parallel": {"sequence_parallel": 2}}
    with pytest.raises(ValueError, match=r"parallel.sequence_parallel=2: .*factorised"):
        from_dict(RunConfig, base)
    with pytest.raises((ValueError, ConfigError), match=r"parallel.sequence_parallel"):
        from_dict(RunConfig, {**base, "parallel": {"sequence_parallel": 0}})
    ok = from_dict(RunConfig, {**base, "diffusion": {"denoiser": "wan-tiny"}})
    assert ok.parallel.sequence_parallel == 2
    assert RunConfig().parallel == ParallelConfig(sequence_parallel=1)


def test_data_parallel_position():
    assert [data_parallel_position(r, 8, 4) for r in range(8)] == [(0, 2)] * 4 + [(1, 2)] * 4
    assert data_parallel_position(3, 4, 1) == (3, 4)
    with pytest.raises(ValueError, match=r"parallel.sequence_parallel=4 does not divide the 6 launched processes"):
        data_parallel_position(0, 6, 4)
