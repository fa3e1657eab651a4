"""Image-to-video on the moving digits, taken apart: which first frames and which directions fail, and the ceiling.

The video quickstart's report animates 20 still validation digits (the demo image, centred) in the four directions
and reads whether each clip moves as prompted (:mod:`training.motion_check`). This script repeats that reading per
direction, for three kinds of first frame, and reads the real clips the same way (the check's own ceiling):

* ``centred``: the still digit itself — the report's case. The moving-digits clips have 9 frames with the still in
  the middle, and a training clip is a 5-frame window of one. With ``cache.clip_frames: 9`` (the preset since
  2026-12-07) every read cuts a fresh window, one in five of them starting at the still; a cache of 5-frame clips
  (``cache.clip_frames: null``, the earlier runs) holds the centred window only (frames 2–6), whose first frame is
  ``start-2`` below, so the model never saw a clip start at the still. From the still the digit must leave the
  frame at once (the demo digits fill the frame's height, so an upward or downward move cuts rows immediately);
* ``start-0`` / ``start-2``: the first frame of the window that starts at frame 0 / 2 (the digit shifted 4 / 2
  pixels against the prompted direction; ``start-2`` is the first frame of every clip a 5-frame cache holds). Their
  position hints the direction, so they measure whether motion is learnt in distribution, not from a neutral frame.

    python benchmarks/i2v_breakdown.py runs/quickstart-video [more runs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FIRST_FRAMES = {"centred": 4, "start-0": 0, "start-2": 2}  # frame index of the 9-frame clip the window starts at


def breakdown(run_dir: Path, per_digit: int, guidance: float) -> dict[str, Any]:
    import numpy as np
    import torch

    from data_pipeline.demo import load_digits_split
    from data_pipeline.moving_digits import DIRECTIONS, caption_for, offsets, shift
    from training.builders import open_run, run_config_of
    from training.evaluation import DigitClassifier
    from training.motion_check import read_clips, scores

    cfg = run_config_of(run_dir)
    frames = cfg.diffusion.validation_num_frames or 5
    pipe = open_run(run_dir, weights="export", device="cpu", cfg=cfg)
    clf, _ = DigitClassifier.for_demo(cfg.data.seed)
    _, _, xva, yva = load_digits_split(cfg.data.seed)
    chosen = np.concatenate([np.flatnonzero(yva == d)[:per_digit] for d in range(10)])  # the report's stills
    digits = np.repeat(yva[chosen], len(DIRECTIONS))
    dirs = np.tile(np.arange(len(DIRECTIONS)), len(chosen))
    prompts = [caption_for(int(d), DIRECTIONS[k]) for d, k in zip(digits, dirs)]
    stills = [xva[chosen[i // len(DIRECTIONS)]] for i in range(len(prompts))]

    def window(start: int, length: int) -> torch.Tensor:
        """(B, 3, length, 32, 32) in [-1, 1]: the true clip frames from ``start`` for every prompt."""
        clips = [np.stack([shift(img, int(dx), int(dy)) for dx, dy in offsets(DIRECTIONS[k])[start:start + length]])
                 for img, k in zip(stills, dirs)]
        return torch.from_numpy(np.stack(clips)).float().permute(0, 4, 1, 2, 3) / 127.5 - 1

    out: dict[str, Any] = {"run": str(run_dir), "guidance": guidance, "clips": len(prompts)}
    for name, start in FIRST_FRAMES.items():
        real = read_clips(window(start, frames), clf)
        with torch.no_grad():
            clips = pipe.generate(prompts, guidance=guidance, num_frames=frames, first_frames=window(start, 1)[:, :, 0])
        got = read_clips(clips, clf)
        out[name] = {
            **scores(got, digits, dirs),
            "direction_by_prompt": {DIRECTIONS[k]: float((got.direction[dirs == k] == k).mean())
                                    for k in range(len(DIRECTIONS))},
            "real_clips": scores(real, digits, dirs),  # the check on the true clips from the same first frames
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--per-digit", type=int, default=2, help="still validation digits per class (the report's)")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--json", default="runs/i2v_breakdown.json")
    args = parser.parse_args()
    results = [breakdown(Path(r), args.per_digit, args.guidance) for r in args.runs]
    print("| run | first frame | moves as prompted | left / right / up / down | keeps the digit | real clips: "
          "direction / digit |")
    print("| --- | --- | --- | --- | --- | --- |")
    for res in results:
        for name in FIRST_FRAMES:
            r = res[name]
            by = " / ".join(f"{v:.0%}" for v in r["direction_by_prompt"].values())
            print(f"| {Path(res['run']).name} | {name} | {r['direction_accuracy']:.1%} | {by} | "
                  f"{r['digit_accuracy']:.1%} | {r['real_clips']['direction_accuracy']:.1%} / "
                  f"{r['real_clips']['digit_accuracy']:.1%} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
