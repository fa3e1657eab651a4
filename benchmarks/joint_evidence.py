"""Joint image+video training (Imagen Video): do still images teach a video model what its clips never show?

The clips of the moving-digits set are cut to the digits 0–4; the digits 5–9 appear only as still images (the image
quickstart's demo shards, every digit, captioned "a handwritten digit seven"). Two video runs, same network (the
quickstart-video DiT from scratch: ``inflate_from=null``, so no image model carries the digits in; the image
quickstart's autoencoder frame by frame, no autoencoder stage; the preset's clip cache, fresh 5-frame windows of 9),
same steps and batch size, same seed:

* ``video``: the clips of 0–4 alone;
* ``joint``: the same clips mixed 1:1 per sample with the still images (``data.sources``; an image is a one-frame
  clip, batched in its own bucket, never its own image-to-video conditioning) — so half of its batches are stills and
  it sees half as many clips.

Each run then draws, at guidance 3, 5 clips for every digit × direction prompt ("a handwritten digit seven moving
left") and :mod:`training.motion_check` reads direction, digit and consistency, separately for the digits its clips
showed (0–4) and for those only its images showed (5–9). Imagen Video's claim holds here if ``joint`` animates 5–9
(right digit, moving as asked) where ``video`` cannot, at no loss on 0–4.

    python benchmarks/joint_evidence.py --seeds 2 --threads 1
    python benchmarks/joint_evidence.py --arms joint --image-weight 0.5 --tag=-2to1 \
        --json runs/joint_evidence_2to1.json diffusion.train.max_steps=2700   # as many clip batches as `video`

Needs the image quickstart's shards and models (``make quickstart``: data/demo, runs/quickstart) and writes the
0–4 clip shards itself. CPU, 2 cores: about 6 minutes a run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when imported by a test
from common import loom_train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEEN, UNSEEN = range(0, 5), range(5, 10)  # digits the clips show · digits only the still images show
ARMS = ("video", "joint")
# the arms differ in their data only: no autoencoder stage, the image quickstart's autoencoder frame by frame
FROZEN_PARTS = ["pipeline=[cache,diffusion]",
                "diffusion.autoencoder_weights=runs/quickstart/autoencoder/export/model.safetensors"]
MEASURES = ("direction_accuracy", "digit_accuracy", "temporal_consistency")


def write_clip_shards(out: Path) -> Path:
    """The moving-digits train split cut to the digits of :data:`SEEN` (the validation split stays whole)."""
    from data_pipeline.demo import write_split_set
    from data_pipeline.moving_digits import CRF, clip_samples
    from data_pipeline.writer import WriterOptions

    if not (out / "train.shardindex.json").exists():
        write_split_set(out, lambda split: [s for s in clip_samples(split)
                                            if split == "val" or s.extra["label"] in SEEN],
                        WriterOptions(1000, video_crf=CRF), 0.1, progress=False)
    return out


def data_overrides(arm: str, clips: Path, images: Path, image_weight: float = 1.0) -> list[str]:
    sources = [f"{{urls: '{clips}/train-000000.tar', name: clips-0to4}}"]
    if arm == "joint":
        sources.append(f"{{urls: '{images}/train-{{000000..000001}}.tar', name: still-images, "
                       f"weight: {image_weight}}}")
    return ["data.urls=", f"data.sources=[{', '.join(sources)}]", "data.image_keys=[mp4, png]",
            f"val_data.urls={clips}/val-000000.tar"]


def measure(run_dir: Path, per_prompt: int, seed: int) -> dict[str, Any]:
    """Guided clips for every digit × direction prompt, read by the motion check, split by :data:`SEEN` / UNSEEN."""
    import numpy as np
    import torch

    from data_pipeline.moving_digits import DIRECTIONS, caption_for
    from training.builders import open_run
    from training.evaluation import DigitClassifier
    from training.motion_check import read_clips, scores

    pipe = open_run(run_dir, weights="export", device="cpu")
    clf, _ = DigitClassifier.for_demo(seed)
    out: dict[str, Any] = {}
    for name, digits in (("seen", SEEN), ("unseen", UNSEEN)):
        d = np.repeat(np.array(list(digits)), len(DIRECTIONS) * per_prompt)
        k = np.tile(np.repeat(np.arange(len(DIRECTIONS)), per_prompt), len(digits))
        with torch.no_grad():
            clips = pipe.generate([caption_for(int(a), DIRECTIONS[b]) for a, b in zip(d, k)], guidance=3.0,
                                  num_frames=5)
        for key, value in scores(read_clips(clips, clf), d, k).items():
            out[f"{name}_{key}"] = value
    return out


def run_arm(arm: str, seed: int, clips: Path, images: Path, out_dir: Path, threads: int,
            extra: list[str], image_weight: float = 1.0, tag: str = "") -> dict[str, Any]:
    name = f"joint-evidence{tag}-{arm}-s{seed}"
    seconds = loom_train(["--config", "quickstart-video", f"run.name={name}", f"run.output_dir={out_dir}",
                          f"run.seed={seed}", f"data.seed={seed}", "diffusion.inflate_from=null",
                          *FROZEN_PARTS, "diffusion.train.progress=false", "report.enabled=false",
                          *data_overrides(arm, clips, images, image_weight), *extra], threads, REPO)
    return {"arm": arm, "seed": seed, "seconds": seconds, **measure(out_dir / name, 5, seed)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{arm: {measure: {"mean", "min"}}}`` over the seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        keys = [k for k in mine[0] if k.startswith(("seen_", "unseen_"))]
        out[arm] = {k: {"mean": sum(r[k] for r in mine) / len(mine), "min": min(r[k] for r in mine)} for k in keys}
    return out


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    arms = list(summary)
    lines = ["| digits | measurement | " + " | ".join(f"{a}: mean / min" for a in arms) + " |",
             "|" + " --- |" * (len(arms) + 2)]
    for group, label in (("seen", "0–4 (in clips)"), ("unseen", "5–9 (still images only)")):
        for m in MEASURES:
            cells = [f"{summary[a][f'{group}_{m}']['mean']:.1%} / {summary[a][f'{group}_{m}']['min']:.1%}"
                     for a in arms]
            lines.append(f"| {label} | {m.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0 .. N-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--images", default=str(REPO / "data" / "demo"), help="the image quickstart's shards")
    parser.add_argument("--output-dir", default=str(REPO / "runs"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-weight", type=float, default=1.0, help="images per clip in the joint mix")
    parser.add_argument("--tag", default="", help="run-name suffix for runs with other settings")
    parser.add_argument("--json", default=str(REPO / "runs" / "joint_evidence.json"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    out_dir = Path(args.output_dir)
    images = Path(args.images)
    if not (images / "train.shardindex.json").exists():
        raise SystemExit(f"--images {images}: no image shards there (make quickstart writes data/demo)")
    clips = write_clip_shards(out_dir / "joint-evidence-clips-0to4")
    json_path = Path(args.json)
    rows = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for arm in args.arms:
            if any(r["arm"] == arm and r["seed"] == seed for r in rows):
                continue  # measured before (delete the JSON to measure again)
            r = run_arm(arm, seed, clips, images, out_dir, args.threads, args.overrides, args.image_weight, args.tag)
            print(f"{arm} seed {seed}: " + ", ".join(f"{k} {v:.1%}" for k, v in r.items()
                                                      if k.startswith(("seen_", "unseen_")))
                  + f" ({r['seconds']:.0f} s)", flush=True)
            rows.append(r)
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({"rows": rows, "summary": summarise(rows)}, indent=1))
    summary = summarise(rows)
    print(table(summary))
    print(f"written {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
