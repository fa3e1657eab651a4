"""Evidence that the ``lora`` stage teaches a video model a motion it never saw, measured from generated clips.

    python benchmarks/video_lora_evidence.py --base runs/quickstart-video           # seed 0 (~5 min CPU)
    python benchmarks/video_lora_evidence.py --base runs/quickstart-video --seed 1  # another adapter seed
    python benchmarks/video_lora_evidence.py --skip-train     # measure the existing adapter again
    python benchmarks/video_lora_evidence.py --set lora.adapter.rank=4 --set run.name=lora-diagonal-r4

The base is a finished video quickstart run (``loom train --config quickstart-video``: an image-to-video DiT with
full 3-D attention, trained on digits moving left, right, up or down). The new motion is *diagonally*: down and
to the right, one pixel per frame on each axis, captioned "a handwritten digit three moving diagonally" (neither
the motion nor the word is in the base's data). ``configs/lora-diagonal.yaml`` trains a rank-8 adapter on the
DiT's attention and feed-forward layers (this DiT has no separate temporal layers, so ``targets: [temporal]`` does
not apply to it; its attention is where frames meet) on every demo digit moving diagonally
(``build_moving_digits(..., directions=["diagonally"])``, written here if missing) mixed 1:1 with the base's
moving-digits clips (prior preservation).

Measured with the base alone and with base + adapter, at guidance 3, same sampling seeds for both:

* **diagonal prompts** "a handwritten digit *d* moving diagonally", ``--samples`` clips per digit: the share of
  clips that moved diagonally (:func:`training.motion_check.is_diagonal` on the registered velocity: both axes
  ≥ 0.25 px/frame, down and right, the slower ≥ half the faster), digit accuracy and temporal consistency
  (:func:`training.motion_check.read_clips`); the same from a given first frame (image-to-video, validation
  stills);
* **plain prompts** "a handwritten digit *d* moving left/right/up/down", ``--plain-samples`` clips per prompt: the
  quickstart report's direction (ink centroid; in brackets the same on the registered shift), digit and
  consistency accuracy (do the old prompts keep their accuracy?) and the share of them read as diagonal (does the
  adapter push everything diagonal?).

Prints a table and writes every number to ``runs/video_lora_evidence-<run name>.json`` (the run name:
``lora-diagonal-s<seed>`` unless ``--set run.name=...``), contact sheets to ``<run>/evidence/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipeline.moving_digits import DIRECTIONS, caption_for  # noqa: E402
from training.evaluation import DigitClassifier, save_grid  # noqa: E402
from training.motion_check import (  # noqa: E402
    diagonal_accuracy,
    direction_of,
    read_clips,
    registered_velocity,
    scores,
)

ROOT = Path(__file__).resolve().parent.parent
BASE_RUN = Path("runs/quickstart-video")
DIAGONAL_DIR = Path("data/moving-diagonal")
PLAIN_DIR = Path("data/moving-digits")
CONFIG = "lora-diagonal"
GUIDANCE = 3.0
SEED_STRIDE = 100_003  # sampling seeds of seed s: the seed-0 value + s * SEED_STRIDE


def write_diagonal_shards(out: Path = DIAGONAL_DIR) -> dict[str, int]:
    """Every demo digit moving diagonally (the moving-digits split, seed 0), unless already written."""
    from data_pipeline.moving_digits import build_moving_digits

    if (out / "train.shardindex.json").exists() and (out / "val.shardindex.json").exists():
        return {s: json.loads((out / f"{s}.shardindex.json").read_text())["total_samples"] for s in ("train", "val")}
    summaries = build_moving_digits(out, directions=("diagonally",), overwrite=True)
    return {split: summary.samples for split, summary in summaries.items()}


def lora_overrides(base: Path, seed: int, extra: list[str]) -> list[str]:
    """``loom train --config lora-diagonal`` pointed at ``base``'s exported DiT and the frozen parts it used."""
    from training.builders import exported_autoencoder_path, run_config_of

    d = run_config_of(base).diffusion
    ae = exported_autoencoder_path(base) if d.autoencoder_weights == "auto" else d.autoencoder_weights  # base's own
    sources = [{"urls": f"{DIAGONAL_DIR}/train-*.tar", "name": "diagonal"},
               {"urls": f"{PLAIN_DIR}/train-{{000000..000001}}.tar", "name": "plain"}]
    return [f"diffusion.weights={base / 'diffusion/export/model.safetensors'}",
            f"diffusion.autoencoder_weights={ae}",
            f"diffusion.text_encoder.checkpoint={d.text_encoder.checkpoint}",
            f"data.sources={json.dumps(sources)}", f"val_data.urls={DIAGONAL_DIR}/val-000000.tar",
            f"run.name=lora-diagonal-s{seed}", f"run.seed={seed}", f"data.seed={seed}", *extra]


def run_dir_of(overrides: list[str]) -> Path:
    from training.config_io import load_config
    from training.run_config import RunConfig

    return Path(load_config(RunConfig, [CONFIG], overrides).run.directory)


def train(overrides: list[str]) -> None:
    from launch.cli import main

    code = main(["train", "--config", CONFIG, "lora.train.resume=none", *overrides])
    if code:
        raise SystemExit(f"loom train --config {CONFIG} failed with exit code {code}")


@torch.no_grad()
def draw(pipe: Any, prompts: list[str], seed: int, frames: int, first_frames: torch.Tensor | None = None,
         chunk: int = 100) -> torch.Tensor:
    """Clips ``(B, C, T, H, W)`` for ``prompts`` at guidance 3; chunk ``k`` starts from noise seeded ``seed + k``."""
    out = []
    for k in range(0, len(prompts), chunk):
        sampling = dataclasses.replace(pipe.sampling, seed=seed + k)
        ff = None if first_frames is None else first_frames[k:k + chunk]
        out.append(pipe.generate(prompts[k:k + chunk], guidance=GUIDANCE, num_frames=frames, sampling=sampling,
                                 first_frames=ff))
    return torch.cat(out)


def measure(pipe: Any, clf: Any, n_diag: int, n_plain: int, seed: int, frames: int, sheet_dir: Path,
            name: str) -> dict[str, Any]:
    """Diagonal prompts (text- and image-to-video) and plain prompts, read by the motion check."""
    from data_pipeline.demo import load_digits_split

    out: dict[str, Any] = {}
    digits = np.repeat(np.arange(10), n_diag)
    clips = draw(pipe, [caption_for(int(d), "diagonally") for d in digits], seed + 1000 + SEED_STRIDE * seed, frames)
    velocity = registered_velocity(clips)
    reading = read_clips(clips, clf)
    out["diagonal"] = {"clips": len(digits), "diagonal_accuracy": diagonal_accuracy(velocity),
                       "digit_accuracy": float((reading.digit == digits).mean()),
                       "temporal_consistency": float(reading.consistent.mean()),
                       "mean_velocity": velocity.mean(0).round(3).tolist(),
                       "straight_direction_read": {d: float((reading.direction == i).mean())
                                                   for i, d in enumerate(DIRECTIONS)}}
    save_grid(clips[::n_diag], sheet_dir / f"{name}_diagonal_prompts.png", nrow=10, scale=2)

    if pipe.image_conditioned:
        _, _, xva, yva = load_digits_split(0)
        chosen = np.concatenate([np.flatnonzero(yva == d)[:2] for d in range(10)])  # 2 validation stills per digit
        firsts = torch.from_numpy(xva[chosen]).float().permute(0, 3, 1, 2) / 127.5 - 1
        i_digits = yva[chosen]
        clips = draw(pipe, [caption_for(int(d), "diagonally") for d in i_digits], seed + 3000 + SEED_STRIDE * seed,
                     frames, first_frames=firsts)
        reading = read_clips(clips, clf)
        out["diagonal_i2v"] = {"clips": len(i_digits),
                               "diagonal_accuracy": diagonal_accuracy(registered_velocity(clips)),
                               "digit_accuracy": float((reading.digit == i_digits).mean()),
                               "temporal_consistency": float(reading.consistent.mean())}

    p_digits = np.repeat(np.arange(10), 4 * n_plain)
    p_dirs = np.tile(np.repeat(np.arange(4), n_plain), 10)
    clips = draw(pipe, [caption_for(int(d), DIRECTIONS[k]) for d, k in zip(p_digits, p_dirs)],
                 seed + 2000 + SEED_STRIDE * seed, frames)
    got = scores(read_clips(clips, clf), p_digits, p_dirs)
    velocity = registered_velocity(clips)
    # The same direction check on the registered shift: the ink centroid under-reads downward motion of digits
    # that fill the frame's height (their bottom rows leave the frame), so a clip can move down and read "left".
    got["registered_direction_accuracy"] = float((direction_of(velocity) == p_dirs).mean())
    got["diagonal_accuracy"] = diagonal_accuracy(velocity)  # plain clips read as diagonal
    got["clips"] = len(p_digits)
    out["plain"] = got
    save_grid(clips[::n_plain], sheet_dir / f"{name}_plain_prompts.png", nrow=40, scale=2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=BASE_RUN, help="a finished quickstart-video run")
    parser.add_argument("--seed", type=int, default=0, help="run.seed/data.seed of the adapter; sampling seeds")
    parser.add_argument("--samples", type=int, default=10, help="clips per digit for the diagonal prompts")
    parser.add_argument("--plain-samples", type=int, default=5, help="clips per digit × direction prompt")
    parser.add_argument("--skip-train", action="store_true", help="measure the existing adapter again")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of configs/lora-diagonal.yaml (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.chdir(ROOT)
    if args.threads:
        torch.set_num_threads(args.threads)
    base_weights = args.base / "diffusion" / "export" / "model.safetensors"
    if not base_weights.exists():
        print(f"no base model at {base_weights}: train it first (loom train --config quickstart-video)",
              file=sys.stderr)
        return 1
    from training.builders import open_run

    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
                                          f"torch {torch.__version__}", "load_average_at_start": os.getloadavg(),
                               "base": str(args.base), "seed": args.seed, "guidance": GUIDANCE,
                               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    start = time.perf_counter()
    results["data"] = write_diagonal_shards()
    print(f"[data] diagonal clips in {DIAGONAL_DIR}: {results['data']}")
    overrides = lora_overrides(args.base, args.seed, args.set)
    run_dir = run_dir_of(overrides)
    t0, cpu0 = time.perf_counter(), time.process_time()
    if not args.skip_train:
        train(overrides)
    out = Path(f"runs/video_lora_evidence-{run_dir.name}.json")
    if args.skip_train:  # the training time of the run that trained this adapter, when it was recorded
        previous = json.loads(out.read_text()) if out.exists() else {}
        results["train_seconds"] = previous.get("train_seconds")
        results["train_cpu_seconds"] = previous.get("train_cpu_seconds")
    else:
        results["train_seconds"] = time.perf_counter() - t0
        results["train_cpu_seconds"] = time.process_time() - cpu0
    adapter = run_dir / "lora" / "export" / "adapter.safetensors"
    meta = json.loads(adapter.with_suffix(".json").read_text())
    results.update(adapter=str(adapter), adapter_parameters=meta["parameters"], adapter_file_bytes=meta["file_bytes"],
                   adapter_config=meta.get("adapter"), base_unchanged_verified=meta["base_unchanged_verified"],
                   overrides=args.set)
    trained = "not trained in this run" if args.skip_train else f"trained in {results['train_seconds']:.0f} s"
    print(f"[lora] adapter {adapter}: {meta['parameters']:,} parameters ({meta['file_bytes'] / 1024:.0f} KiB), "
          f"{trained}; base weights unchanged: {meta['base_unchanged_verified']}")

    clf, clf_acc = DigitClassifier.for_demo(0)
    results["classifier_val_accuracy"] = clf_acc
    base_pipe = open_run(args.base, weights="export", device="cpu")
    frames = run_frames(args.base)
    t1 = time.perf_counter()
    results["base"] = measure(base_pipe, clf, args.samples, args.plain_samples, args.seed, frames,
                              run_dir / "evidence", "base")
    lora_pipe = dataclasses.replace(base_pipe, denoiser=open_run(args.base, weights="export", device="cpu",
                                                                 adapters=[f"{adapter}:1.0"]).denoiser)
    results["lora"] = measure(lora_pipe, clf, args.samples, args.plain_samples, args.seed, frames,
                              run_dir / "evidence", "lora")
    results["measure_seconds"] = time.perf_counter() - t1
    results["seconds"] = time.perf_counter() - start

    print(f"[measure] guidance {GUIDANCE:g}, {frames} frames, same sampling seeds for both models; diagonal: "
          f"{args.samples} clips per digit (text-to-video) + 2 validation stills per digit (image-to-video); "
          f"plain: {args.plain_samples} clips per digit × direction")
    print("| model | diagonal prompts: moved diagonally | digit | consistent | from a first frame: diagonally "
          "| plain prompts: direction (registered) | digit | consistent | read as diagonal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in ("base", "lora"):
        r = results[name]
        d, p = r["diagonal"], r["plain"]
        i2v = f"{r['diagonal_i2v']['diagonal_accuracy']:.1%}" if "diagonal_i2v" in r else "-"
        print(f"| {name} | {d['diagonal_accuracy']:.1%} | {d['digit_accuracy']:.1%} | {d['temporal_consistency']:.1%}"
              f" | {i2v} | {p['direction_accuracy']:.1%} ({p['registered_direction_accuracy']:.1%}) | "
              f"{p['digit_accuracy']:.1%} | "
              f"{p['temporal_consistency']:.1%} | {p['diagonal_accuracy']:.1%} |")
    for name in ("base", "lora"):
        d = results[name]["diagonal"]
        print(f"[{name}] diagonal prompts: mean registered velocity (dx, dy) {d['mean_velocity']} px/frame; read by "
              f"the 4-way direction check as {d['straight_direction_read']}")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"all numbers in {out} ({results['seconds']:.0f} s; contact sheets in {run_dir / 'evidence'})")
    return 0


def run_frames(base: Path) -> int:
    """The clip length the base run validates at (its report's)."""
    from training.builders import run_config_of

    cfg = run_config_of(base)
    return cfg.report.num_frames or cfg.diffusion.validation_num_frames or cfg.data.video.num_frames


if __name__ == "__main__":
    sys.exit(main())
