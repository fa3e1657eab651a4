"""Guided direction accuracy of a video quickstart run, checkpoint by checkpoint: how many steps to 90%?

Issue 13, point 6 asks whether image pre-training saves video steps (SVD, VideoLDM). Train the run twice, keeping
every checkpoint — from the image model and from scratch:

    loom train --config quickstart-video run.name=curve-image diffusion.train.checkpoint_every=300 \\
        diffusion.train.keep_checkpoints=20 report.enabled=false
    loom train --config quickstart-video run.name=curve-scratch diffusion.inflate_from=null \\
        diffusion.train.checkpoint_every=300 diffusion.train.keep_checkpoints=20 report.enabled=false
    python benchmarks/video_learning_curve.py runs/curve-image runs/curve-scratch

Each checkpoint's EMA weights draw ``--per-prompt`` clips for every digit × direction prompt at guidance 3 (25 DDIM
steps, fixed seed) and :mod:`training.motion_check` reads direction and digit; the table lists both per step and
the first step at which direction accuracy reaches ``--goal``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def curve(run_dir: Path, per_prompt: int, guidance: float) -> list[dict[str, Any]]:
    import numpy as np
    import torch

    from data_pipeline.moving_digits import DIRECTIONS, caption_for
    from training.builders import open_run, run_config_of
    from training.evaluation import DigitClassifier
    from training.motion_check import read_clips, scores

    cfg = run_config_of(run_dir)
    clf, _ = DigitClassifier.for_demo(cfg.data.seed)
    digits = np.repeat(np.arange(10), len(DIRECTIONS) * per_prompt)
    dirs = np.tile(np.repeat(np.arange(len(DIRECTIONS)), per_prompt), 10)
    prompts = [caption_for(int(d), DIRECTIONS[k]) for d, k in zip(digits, dirs)]
    rows = []
    checkpoints = sorted((run_dir / "diffusion" / "checkpoints").glob("step_*"))
    if not checkpoints:
        raise SystemExit(f"{run_dir}: no checkpoints under diffusion/checkpoints (train with keep_checkpoints > 1)")
    for ckpt in checkpoints:
        pipe = open_run(run_dir, weights=str(ckpt), device="cpu", cfg=cfg)
        with torch.no_grad():
            clips = pipe.generate(prompts, guidance=guidance, num_frames=cfg.diffusion.validation_num_frames)
        got = scores(read_clips(clips, clf), digits, dirs)
        rows.append({"step": int(ckpt.name.split("_")[-1]), **got})
        print(f"{run_dir.name} step {rows[-1]['step']}: direction {got['direction_accuracy']:.1%}, "
              f"digit {got['digit_accuracy']:.1%}", flush=True)
    return rows


def first_step(rows: list[dict[str, Any]], goal: float) -> int | None:
    """The first checkpoint step whose direction accuracy is at least ``goal`` (None: never)."""
    return next((r["step"] for r in rows if r["direction_accuracy"] >= goal), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories with their checkpoints kept")
    parser.add_argument("--per-prompt", type=int, default=2, help="clips per digit × direction prompt")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--goal", type=float, default=0.9)
    parser.add_argument("--json", default="runs/video_learning_curve.json")
    args = parser.parse_args()
    results = {str(r): curve(Path(r), args.per_prompt, args.guidance) for r in args.runs}
    steps = sorted({row["step"] for rows in results.values() for row in rows})
    print("| step | " + " | ".join(f"{Path(r).name}: direction / digit" for r in results) + " |")
    print("|" + " --- |" * (len(results) + 1))
    for step in steps:
        cells = []
        for rows in results.values():
            row = next((x for x in rows if x["step"] == step), None)
            cells.append("—" if row is None else f"{row['direction_accuracy']:.1%} / {row['digit_accuracy']:.1%}")
        print(f"| {step} | " + " | ".join(cells) + " |")
    for run, rows in results.items():
        print(f"{Path(run).name}: first step with direction >= {args.goal:.0%}: {first_step(rows, args.goal)}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
