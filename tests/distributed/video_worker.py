"""Trains an image-to-video DiT with the real ``diffusion`` stage and Trainer on real mp4 clip shards, under whatever
strategy the launch set up.

Used by ``tests/distributed/test_video_distributed.py``: as one plain process (the reference), as two DDP ranks
(gloo, CPU), and as one process that Accelerate hands to DeepSpeed ZeRO-2 (a JSON with "auto" values).

    python video_worker.py SHARDS IMAGE_DIT OUT_DIR [SCENARIOS]

SHARDS: the folder :func:`write_clip_shards` wrote; IMAGE_DIT: the exported image DiT :func:`write_image_dit` wrote,
which the video DiT is inflated from (``diffusion.inflate_from``: each image block followed by a temporal block,
1-D RoPE over frames, the first frame's pixels concatenated to the input). SCENARIOS is a comma list of ``full``
(``STEPS`` optimizer steps), ``head`` (the first ``CHECKPOINT``, with a checkpoint) and ``tail`` (the ``full`` command
again in the same run folder as ``head``: it resumes from that checkpoint) — default ``full``.

Why the runs can be compared step by step: the clips come through the real streaming loader (PyAV decoding, clip
start drawn from each sample's counter-based draw, buckets of ``FRAMES`` frames) from one shard, with no shuffling.
With fewer shards than ranks the loader splits by sample, so rank r of w reads samples r, r+w, ... of the shard
and the single process with ``w`` times the batch reads, at every micro-batch, exactly the union of what the ranks
read. The random draws of the stage's objective (:class:`~training.stages.diffusion.DenoisingObjective`) — the
noise, the timestep, the text-dropout draw and the image-dropout draw of every sample — come from generators seeded
by the sample's key and the micro-batch's index (the same mechanism as ``finetune_worker.KeyedNoise``, extended to
the two dropout draws), not from the process's RNG, so a sample's loss depends on the weights alone, whichever
rank sees it. The stage's loss is the mean over its micro-batch and DDP averages over ranks, so 2 ranks × b clips
give the gradient of 1 process × 2b. Gradient accumulation (2 micro-batches per step), clipping and an EMA are on.

Each rank writes ``OUT_DIR/<scenario>_rank<r>.json``: its rank, world size, strategy, the step reached, and for
each of its micro-batches the loss, the sample keys, the clip start frames the loader drew and the fractions of
text and image conditioning dropped; rank 0's run folder ``OUT_DIR/run_<full|split>`` holds the TensorBoard log
(``loss``, ``grad_norm`` per step), the checkpoints and the exported (EMA) weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for p in (str(REPO), str(HERE), str(REPO / "tests" / "data")):
    if p not in sys.path:
        sys.path.insert(0, p)

from finetune_worker import KeyedNoise, key_seed  # noqa: E402

import models.conditioning as conditioning  # noqa: E402
from data_pipeline.data_config import BucketConfig, DataConfig, VideoConfig  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from models.dit import DiT, DiTConfig  # noqa: E402
from models.text_encoder import TextEncoder, TextEncoderConfig  # noqa: E402
from training.builders import distributed_position  # noqa: E402
from training.diffusion import DiffusionConfig  # noqa: E402
from training.sharding import strategy_name  # noqa: E402
from training.stages.autoencoder import export_module  # noqa: E402
from training.stages.diffusion import DiffusionStage, DiffusionStageConfig  # noqa: E402
from training.trainer import OptimConfig, TrainConfig, Trainer  # noqa: E402

DEVICE = os.environ.get("LATENTLOOM_SHARDING_DEVICE", "cpu")  # cuda: one GPU (launch/gpu_check.sh), no DDP run
STEPS = 4
CHECKPOINT = 2
GRAD_ACCUM = 2
GLOBAL_BATCH = 8  # clips per micro-batch, over all ranks
N_CLIPS = 32  # one shard: 2 steps an epoch, so the run crosses an epoch (new clip starts, new noise)
SIZE = 8  # pixels a side after resizing (pixel space: the DiT's sample size)
FRAMES = 4  # frames per clip (one bucket)
TE = TextEncoderConfig(model="openclip-tiny-text", layer="last")
IMAGE_DIT = DiTConfig(sample_size=SIZE, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                      context_dim=64, pooled_dim=32, attention_backend="math" if DEVICE == "cuda" else "sdpa")
# the image-to-video DiT the image DiT inflates into: factorised (spatial, temporal) blocks, RoPE over frames
VIDEO_DIT = DiT.inflated_config(IMAGE_DIT, concat_image_latents=True)
COND_DROPOUT = 0.25  # text dropout (CFG)
IMAGE_DROPOUT = 0.5  # first-frame dropout (image-to-video CFG)


def write_clip_shards(directory: Path) -> Path:
    """One shard of ``N_CLIPS`` H.264 mp4 clips (6 to 10 frames of 16×16, grey levels rising with the frame index,
    a white corner on every other clip) with captions, and its shard index."""
    from clipmaker import clip_bytes
    from shardmaker import write_shardset

    clips = [(f"clip{i:03d}", {"mp4": clip_bytes(6 + i % 5, h=16, w=16, corner=i % 2 == 0),
                               "txt": f"a grey clip number {i % 7}".encode()}) for i in range(N_CLIPS)]
    write_shardset(directory, "train", [clips])
    return Path(directory)


def write_image_dit(directory: Path) -> Path:
    """An exported image DiT (``model.safetensors`` + ``model.json``) with every weight random but seeded (a fresh
    DiT's zero-initialised output layers would leave most gradients zero in a run of a few steps)."""
    g = torch.Generator().manual_seed(0)
    model = DiT(IMAGE_DIT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return export_module(model, IMAGE_DIT, Path(directory))


def data_config(shards: Path, batch: int) -> DataConfig:
    return DataConfig(urls=str(Path(shards) / "train-000000.tar"), image_keys=["mp4"], resolution=SIZE,
                      batch_size=batch, num_workers=0, shuffle_buffer=0, shard_shuffle=False, seed=0,
                      video=VideoConfig(num_frames=FRAMES, frame_stride=1, clip_start="random"),
                      buckets=BucketConfig(frames=[FRAMES]))


class KeyedDraws(KeyedNoise):
    """:class:`finetune_worker.KeyedNoise` (per-sample noise and timesteps) plus per-sample conditioning-dropout
    draws: the objective's calls of :func:`models.conditioning.dropout_mask` (the text group, then the image group)
    draw sample i's uniform number from a generator seeded by its key and the call's index within the loss.
    Calls with an explicit generator or of another batch size keep the process's own draws."""

    def __init__(self, process: Any):
        super().__init__(process)
        self.calls = 0
        self._mask = conditioning.dropout_mask
        conditioning.dropout_mask = self.dropout_mask  # drop_conditioning looks it up in its module

    def set_keys(self, keys: list[str]) -> None:
        self.keys, self.calls = keys, 0

    def dropout_mask(self, batch_size: int, p: float, generator: Optional[torch.Generator] = None,
                     device: Any = "cpu") -> torch.Tensor:
        if generator is not None or len(self.keys) != batch_size:
            return self._mask(batch_size, p, generator, device)
        self.calls += 1
        draws = [self._mask(1, p, torch.Generator().manual_seed(key_seed(k) + 1 + self.calls), "cpu")
                 for k in self.keys]
        return torch.cat(draws).to(device)


def recording(stage: DiffusionStage, first_micro_batch: int = 0) -> DiffusionStage:
    """``stage`` whose ``loss`` keys the draws by (sample key, micro-batch index of the run, counted from
    ``first_micro_batch``: where a resumed run starts) and records each micro-batch."""
    stage.keyed = KeyedDraws(stage.process)
    stage.records = []
    objective_loss = stage.loss

    def loss(model, batch):
        n = first_micro_batch + len(stage.records)
        stage.keyed.set_keys([f"{k}@{n}" for k in batch.keys])  # the same micro-batch index in every process
        value, logs = objective_loss(model, batch)
        stage.records.append({"loss": float(value.detach()), "keys": list(batch.keys),
                              "frames": list(batch.pixels.shape[1:]),
                              "clip_starts": [m.get("clip_start_frame") for m in batch.metadata],
                              "text_dropped": float(logs["dropped_fraction"]),  # a device tensor: read here
                              "image_dropped": float(logs["image_dropped_fraction"])})
        return value, logs

    stage.loss = loss
    return stage


def build_stage(image_dit: Path, first_micro_batch: int = 0) -> DiffusionStage:
    cfg = DiffusionStageConfig(denoiser="dit", model={"dit": VIDEO_DIT}, inflate_from=str(image_dit),
                               text_encoder=TE, latents="pixels", cond_dropout=COND_DROPOUT,
                               image_dropout=IMAGE_DROPOUT, validation_prompts=[],
                               process=DiffusionConfig(schedule="cosine", prediction="v_prediction"))
    torch.manual_seed(1234)  # the same text tower in every process
    text_encoder = TextEncoder(TE)
    return recording(DiffusionStage(cfg, text_encoder, None, (SIZE, SIZE)), first_micro_batch)


def train_config(steps: int, deepspeed: bool) -> TrainConfig:
    """``cpu`` stays off under DeepSpeed (Accelerate ignores DeepSpeed when asked for the CPU; without a visible GPU
    the device is the CPU anyway)."""
    # Adam with eps = 1: for these small gradients the update is ~ lr × gradient, so float summation order (two
    # halves all-reduced against one sum) stays at its own size in the weights; plain Adam would blow the rounding
    # noise of exactly-zero gradients (attention key biases) up to ±lr
    return TrainConfig(max_steps=steps, grad_accum=GRAD_ACCUM, cpu=DEVICE == "cpu" and not deepspeed,
                       optim=OptimConfig(lr=1.0, eps=1.0, max_grad_norm=1.0), ema_decay=0.5, ema_warmup=False,
                       log_every=1, checkpoint_every=CHECKPOINT, keep_checkpoints=3, progress=False)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(shards: Path, image_dit: Path, out: Path, scenario: str) -> dict[str, Any]:
    rank, world = distributed_position()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    steps = CHECKPOINT if scenario == "head" else STEPS
    run_dir = out / f"run_{'full' if scenario == 'full' else 'split'}"
    # a resumed run (tail) goes on from the head's checkpoint: its micro-batches continue the head's count (the
    # test checks that the trainer did resume there: the head's and the tail's losses make the full run's)
    stage = build_stage(image_dit, CHECKPOINT * GRAD_ACCUM if scenario == "tail" else 0)
    batch = GLOBAL_BATCH // world
    trainer = Trainer(train_config(steps, deepspeed), stage, build_loader(data_config(shards, batch), rank, world),
                      run_dir, micro_batch_size=batch, seed=0)
    result = trainer.fit()
    acc = trainer.accelerator
    model = acc.unwrap_model(acc._models[-1])
    return {"rank": rank, "world": world, "strategy": strategy_name(acc), "step": result.step,
            "micro_batches": stage.records, "digest": weights_digest(model),
            "export": str(result.export_path) if result.export_path else None}


def main(shards: str, image_dit: str, out_dir: str, scenarios: str = "full") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, _ = distributed_position()
    for scenario in scenarios.split(","):
        report = run(Path(shards), Path(image_dit), out, scenario)
        (out / f"{scenario}_rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    from worker_setup import prepare_worker

    prepare_worker(DEVICE)
    main(*sys.argv[1:])
