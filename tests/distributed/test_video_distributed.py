"""A video run — an image-to-video DiT inflated from an image DiT, trained by the real ``diffusion`` stage on decoded
mp4 clips — under DDP (two processes, gloo) and under DeepSpeed ZeRO-2 through Accelerate gives the single
process's result, and a video run stopped by SIGTERM resumes to the uninterrupted run's weights, bit for bit.

``video_worker.py`` trains the stage with the real Trainer and streaming loader on fixed global batches split over
the ranks, with per-sample noise, timesteps and dropout draws keyed by the sample (see its docstring). Runs, side by
side:

* ``single``: one plain process (the reference);
* ``ddp``: two ranks, each with half of every global batch (CPU only: NCCL cannot put two ranks on one GPU);
* ``zero2``: one process that Accelerate hands to DeepSpeed ZeRO-2 from a JSON of "auto" values, once straight
  through and once stopped at its checkpoint and resumed.

The SIGTERM test is ``loom train`` itself (``launch/torchrun_multinode.sh``, two ranks, one DataLoader worker each,
the objective's own random draws and a token-count timestep shift), as ``test_faults.py`` does for images.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))

import video_worker as worker  # noqa: E402
from harness import (  # noqa: E402
    TORCHRUN_SCRIPT,
    assert_same_weights,
    checkpoints,
    descendants,
    final_weights,
    finish,
    free_port,
    kill_session,
    launch_env,
    python_processes,
    scalars,
    start,
    stop_job,
    wait_for,
)
from sharding_launch import Ranks, base_env, sharding_device  # noqa: E402
from sharding_worker import deepspeed_json  # noqa: E402

from training.config_io import to_dict  # noqa: E402
from training.stages.diffusion import inflate_denoiser  # noqa: E402

pytest.importorskip("av")
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video-inputs")
    return {"shards": worker.write_clip_shards(root / "shards"), "image_dit": worker.write_image_dit(root / "image")}


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("video-distributed")
    ds_json = root / "zero2.json"
    ds_json.write_text(json.dumps(deepspeed_json(2)))
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json)}
    plan = {"single": (1, {}, "full"), "zero2": (1, deepspeed, "full,head,tail")}
    if sharding_device() == "cpu":
        plan["ddp"] = (2, {}, "full")
    started = {name: Ranks(Path(worker.__file__), [inputs["shards"], inputs["image_dit"], root / name, scenarios],
                           world, base_env(env), root / name / "logs", launched=name != "single")
               for name, (world, env, scenarios) in plan.items()}  # "single": no launcher variables at all
    out: dict = {"root": root}
    for name, ranks in started.items():
        ranks.wait(timeout=300)
        world, _, scenarios = plan[name]
        out[name] = {s: [json.loads((root / name / f"{s}_rank{r}.json").read_text()) for r in range(world)]
                     for s in scenarios.split(",")}
    return out


def _export(runs: dict, name: str, split: bool = False) -> dict[str, torch.Tensor]:
    return load_file(str(runs["root"] / name / f"run_{'split' if split else 'full'}" / "export" / "model.safetensors"))


def _logged(runs: dict, name: str, tag: str) -> torch.Tensor:
    values = scalars(runs["root"] / name / "run_full" / "logs" / "diffusion", tag)
    assert [s for s, _ in values] == list(range(1, worker.STEPS + 1)), (name, tag, values)
    return torch.tensor([v for _, v in values])


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_reference_run_trains_the_video_model_on_decoded_clips(runs, inputs):
    """The reference run really is a video run: 4-frame clips decoded from the mp4 shard, new clip starts in the
    second epoch, both conditioning dropouts drawn, the loss falling, and the inflated model's new parts — the
    temporal blocks' gates and the first frame's input channels, all zero at inflation — trained."""
    (r,) = runs["single"]["full"]
    assert (r["strategy"], r["world"], r["step"]) == ("single", 1, worker.STEPS)
    mbs = r["micro_batches"]
    assert len(mbs) == worker.STEPS * worker.GRAD_ACCUM
    assert all(m["frames"] == [3, worker.FRAMES, worker.SIZE, worker.SIZE] for m in mbs)
    assert all(len(m["keys"]) == worker.GLOBAL_BATCH for m in mbs)
    epoch = len(mbs) // 2  # 32 clips = 4 micro-batches of 8
    assert [m["keys"] for m in mbs[:epoch]] == [m["keys"] for m in mbs[epoch:]]
    assert [m["clip_starts"] for m in mbs[:epoch]] != [m["clip_starts"] for m in mbs[epoch:]]
    for tag in ("text_dropped", "image_dropped"):
        assert 0 < sum(m[tag] for m in mbs) / len(mbs) < 1, tag
    losses = [m["loss"] for m in mbs]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.75 * losses[0], losses

    inflated = inflate_denoiser(worker.VIDEO_DIT, inputs["image_dit"]).state_dict()
    trained = _export(runs, "single")
    assert trained.keys() == inflated.keys()
    channels = worker.IMAGE_DIT.in_channels
    new = {f"blocks.{i}.adaLN_modulation.1.{p}": (...,) for i in range(1, worker.VIDEO_DIT.depth, 2)
           for p in ("weight", "bias")}  # the temporal blocks' modulation (their adaLN-Zero gates)
    new["x_embedder.weight"] = (slice(None), slice(channels, None))  # the first frame's input channels
    for k, part in new.items():
        assert not inflated[k][part].any(), k  # silent at inflation
        assert trained[k][part].abs().max() > 1e-2, k  # trained


def test_two_ddp_ranks_with_half_batches_train_the_video_model_like_one_process(runs):
    """Two ranks × 4 clips: at every micro-batch the ranks' clips (same keys, same clip starts) make the single
    process's 8, the mean of the ranks' losses is its loss, the per-step loss and gradient norm logged after the
    all-reduce are its, and the exported (EMA) weights match."""
    if "ddp" not in runs:
        pytest.skip("two ranks on one GPU: NCCL refuses; DDP runs in the CPU suite")
    (single,) = runs["single"]["full"]
    ranks = runs["ddp"]["full"]
    assert [(r["rank"], r["world"], r["strategy"], r["step"]) for r in ranks] == [
        (0, 2, "ddp", worker.STEPS), (1, 2, "ddp", worker.STEPS)]
    ref = single["micro_batches"]
    for i, (a, b) in enumerate(zip(ranks[0]["micro_batches"], ranks[1]["micro_batches"], strict=True)):
        assert len(a["keys"]) == len(b["keys"]) == worker.GLOBAL_BATCH // 2
        assert not set(a["keys"]) & set(b["keys"]) and set(a["keys"]) | set(b["keys"]) == set(ref[i]["keys"]), i
        starts = dict(zip(ref[i]["keys"], ref[i]["clip_starts"]))
        assert all(starts[k] == s for m in (a, b) for k, s in zip(m["keys"], m["clip_starts"])), i
        for tag in ("text_dropped", "image_dropped"):  # the same samples dropped (equal halves: mean of fractions)
            assert (a[tag] + b[tag]) / 2 == ref[i][tag], (i, tag)
    assert len(ranks[0]["micro_batches"]) == len(ref)
    mean = [(a["loss"] + b["loss"]) / 2 for a, b in zip(ranks[0]["micro_batches"], ranks[1]["micro_batches"])]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor([m["loss"] for m in ref]), rtol=1e-5, atol=1e-6)
    assert [m["loss"] for m in ranks[0]["micro_batches"]] != [m["loss"] for m in ranks[1]["micro_batches"]]
    for tag in ("loss", "grad_norm"):
        torch.testing.assert_close(_logged(runs, "ddp", tag), _logged(runs, "single", tag), rtol=1e-5, atol=1e-7,
                                   msg=tag)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # the same weights on both ranks after every all-reduce
    assert ranks[0]["export"] and ranks[1]["export"] is None  # rank 0 alone writes files
    # Adam with eps = 1 (video_worker.train_config): float summation order stays ~1e-7 in the weights, which the
    # run moved by up to ~0.5 (the temporal blocks) and ~1e-2 at least (their gates, test above)
    _close(_export(runs, "ddp"), _export(runs, "single"), atol=1e-6)


def test_zero2_trains_the_video_model_like_one_process_and_resumes(runs):
    """DeepSpeed ZeRO-2 (its own accumulation, clipping and fp32 partition): the single process's losses, gradient
    norms and exported weights; stopped at the checkpoint and resumed, the same again, exactly."""
    (single,) = runs["single"]["full"]
    (full,) = runs["zero2"]["full"]
    (head,) = runs["zero2"]["head"]
    (tail,) = runs["zero2"]["tail"]
    assert full["strategy"] == "zero2" and full["step"] == tail["step"] == worker.STEPS
    assert head["step"] == worker.CHECKPOINT
    tol = 1e-6 if sharding_device() == "cpu" else 1e-4  # CUDA: DeepSpeed's flat buffers may sum in another order
    assert [m["keys"] for m in full["micro_batches"]] == [m["keys"] for m in single["micro_batches"]]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in full["micro_batches"]]),
                               torch.tensor([m["loss"] for m in single["micro_batches"]]), rtol=tol, atol=tol)
    for tag in ("loss", "grad_norm"):
        torch.testing.assert_close(_logged(runs, "zero2", tag), _logged(runs, "single", tag), rtol=tol, atol=tol,
                                   msg=tag)
    _close(_export(runs, "zero2"), _export(runs, "single"), atol=tol)
    # the resumed run: the same clips (starts included) and losses after the checkpoint, the same weights
    assert head["micro_batches"] + tail["micro_batches"] == full["micro_batches"]
    _close(_export(runs, "zero2", split=True), _export(runs, "zero2"), atol=0.0)


# ------------------------------------------------------------------------------------------- SIGTERM and resume

STEPS = 12  # optimizer steps of the `loom train` runs (2 ranks × 4 clips: 4 steps an epoch)
CHECKPOINT_EVERY = 2


def video_config(path: Path, inputs: dict[str, Path], output_dir: Path, num_workers: int) -> Path:
    """``loom train``'s config of the same image-to-video run: clips from the mp4 shard, the video DiT inflated
    from the image DiT, the objective's own random draws (text and image dropout, noise, timesteps shifted by the
    clip's token count), EMA, checkpoints every 2 steps."""
    cfg = {
        "run": {"name": "video", "output_dir": str(output_dir), "seed": 0},
        "data": {"urls": str(inputs["shards"] / "train-000000.tar"), "image_keys": ["mp4"],
                 "resolution": worker.SIZE, "batch_size": worker.GLOBAL_BATCH // 2, "num_workers": num_workers,
                 "shuffle_buffer": 16, "seed": 0,
                 "video": {"num_frames": worker.FRAMES, "frame_stride": 1, "clip_start": "random"},
                 "buckets": {"frames": [worker.FRAMES]}},
        "pipeline": ["diffusion"],
        "diffusion": {
            "denoiser": "dit", "latents": "pixels", "inflate_from": str(inputs["image_dit"]),
            "model": {"dit": to_dict(worker.VIDEO_DIT)},
            "text_encoder": {"model": worker.TE.model, "layer": worker.TE.layer},
            "process": {"kind": "discrete", "schedule": "cosine", "prediction": "v_prediction",
                        "token_shift": True, "token_shift_base": 16},
            "cond_dropout": worker.COND_DROPOUT, "image_dropout": worker.IMAGE_DROPOUT, "image_noise": 0.05,
            "train": {"max_steps": STEPS, "cpu": True, "progress": False, "log_every": 1,
                      "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 50, "ema_decay": 0.9,
                      "optim": {"lr": 1.0e-3, "max_grad_norm": 1.0}},
            "validation_prompts": [],
        },
        "report": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _torchrun_env(**extra):
    port = free_port()
    return launch_env(NNODES=1, NODE_RANK=0, NPROC_PER_NODE=2, MASTER_PORT=port, RDZV_ID=f"video{port}", **extra)


@pytest.mark.slow
def test_sigterm_stops_a_two_rank_video_run_and_the_same_command_resumes_it_exactly(inputs, tmp_path):
    """``loom train`` on two ranks (torchrun, gloo), each with a DataLoader worker decoding the clips: SIGTERM to
    every process of the job once the first checkpoint is written → a checkpoint and exit 0; the same command again
    resumes from it and ends with the exported and live weights of a run never interrupted (no DataLoader worker,
    started beside it), bit for bit."""
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "stopped"
    ref_cmd = ["bash", str(TORCHRUN_SCRIPT), "train", "--config",
               str(video_config(tmp_path / "reference.yaml", inputs, ref_dir, num_workers=0))]
    cmd = ["bash", str(TORCHRUN_SCRIPT), "train", "--config",
           str(video_config(tmp_path / "stopped.yaml", inputs, run_dir, num_workers=1))]
    stage = run_dir / "video" / "diffusion"
    reference = start(ref_cmd, _torchrun_env(), tmp_path / "reference.out")
    # slowed down (50 ms a micro-batch, no effect on any number) so that the signal surely lands mid-training
    proc = start(cmd, _torchrun_env(TRAIN_MODULE="fault_entry", LOOM_STEP_SLEEP_S=0.05), tmp_path / "first.out")
    try:
        wait_for(stage / "checkpoints" / f"step_{CHECKPOINT_EVERY:08d}" / "trainer_state.json", proc,
                 tmp_path / "first.out", timeout=240)
        job = descendants(proc.pid)
        pythons = python_processes(job)
        assert len(pythons) >= 2 * 2, pythons  # the two ranks and their DataLoader workers get the signal too
        status, left = stop_job(proc, job, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    first = (tmp_path / "first.out").read_text()
    assert status == 0, first[-3000:]
    assert not left, f"processes of the job still alive after it ended: {left}"
    stopped_at = checkpoints(stage)[-1]
    assert CHECKPOINT_EVERY <= stopped_at < STEPS, checkpoints(stage)
    assert f"received signal {int(signal.SIGTERM)}: checkpoint saved at step {stopped_at}" in first, first[-3000:]
    assert not (stage / "export").exists()  # stopped, not finished

    proc = start(cmd, _torchrun_env(), tmp_path / "second.out")
    status = finish(proc, timeout=240)
    second = (tmp_path / "second.out").read_text()
    assert status == 0, second[-3000:]
    assert f"resumed from {stage / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in second
    assert checkpoints(stage)[-1] == STEPS

    status = finish(reference, timeout=240)
    assert status == 0, (tmp_path / "reference.out").read_text()[-3000:]
    assert_same_weights(final_weights(stage), final_weights(ref_dir / "video" / "diffusion"))
