"""Video learning evidence over seeds: the moving-digits quickstart, and whether image pre-training helps.

For each seed, `loom train --config quickstart-video` runs twice with the same video DiT, data, steps and settings:

* ``image``: the video DiT inflated from the image quickstart's DiT (``diffusion.inflate_from``, the default of the
  preset: Stable Video Diffusion's and VideoLDM's claim is that this is what makes video training cheap);
* ``scratch``: the same network from a random initialisation (``diffusion.inflate_from=null``).

Each run's report measures, for every digit × direction prompt, direction / digit / temporal-consistency accuracy
at guidance 0 and 3 and image-to-video from still first frames (:mod:`training.motion_check`). The script writes
every per-seed number, the mean and the minimum over seeds, as JSON and as a markdown table for RESULTS.md.

    python benchmarks/video_evidence.py --seeds 2                      # both inits, seeds 0 and 1
    python benchmarks/video_evidence.py --seeds 3 --inits image        # the quickstart figure alone
    python benchmarks/video_evidence.py --tag -600 diffusion.train.max_steps=600   # a smaller step budget

Needs the image quickstart (``make quickstart``) and the moving-digits shards (``loom shards moving-digits
output_dir=data/moving-digits``). CPU, 2 cores: about 8 minutes a run on a quiet machine.
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
INITS = {"image": [], "scratch": ["diffusion.inflate_from=null"]}
KEYS = [("t2v_direction_accuracy_guidance_3", "direction, guided"),
        ("t2v_digit_accuracy_guidance_3", "digit, guided"),
        ("t2v_temporal_consistency_guidance_3", "consistency, guided"),
        ("t2v_direction_accuracy_guidance_0", "direction, unguided"),
        ("i2v_digit_accuracy_guidance_3", "image-to-video keeps the digit"),
        ("i2v_direction_accuracy_guidance_3", "image-to-video direction")]


def summary(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{key: {"mean", "min"}}`` over the seeds' reports, for every key of :data:`KEYS` they all hold."""
    out = {}
    for key, _ in KEYS:
        values = [r[key] for r in per_seed if key in r]
        if values and len(values) == len(per_seed):
            out[key] = {"mean": sum(values) / len(values), "min": min(values)}
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per measurement, mean / min over seeds for each init."""
    inits = list(results)
    head = "| measurement | " + " | ".join(f"{i} init: mean / min" for i in inits) + " |"
    lines = [head, "|" + " --- |" * (len(inits) + 1)]
    for key, label in KEYS:
        cells = []
        for init in inits:
            s = results[init]["summary"].get(key)
            cells.append("—" if s is None else f"{s['mean']:.1%} / {s['min']:.1%}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_one(init: str, seed: int, out_dir: Path, extra: list[str], threads: int, tag: str = "") -> dict[str, Any]:
    name = f"video-evidence{tag}-{init}-s{seed}"
    seconds = loom_train(["--config", "quickstart-video", f"run.name={name}", f"run.output_dir={out_dir}",
                          f"run.seed={seed}", "diffusion.train.progress=false", *INITS[init], *extra], threads, REPO)
    report = json.loads((out_dir / name / "report.json").read_text())
    return {**report, "seed": seed, "init": init, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0 .. N-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS))
    parser.add_argument("--output-dir", default=str(REPO / "runs"), help="where the runs go")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="run-name suffix, e.g. -600 for runs with other overrides")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "video_evidence.json"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    out_dir = Path(args.output_dir)
    results: dict[str, dict[str, Any]] = {}
    for init in args.inits:
        per_seed = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            r = run_one(init, seed, out_dir, args.overrides, args.threads, args.tag)
            print(f"{init} seed {seed}: " + ", ".join(f"{label} {r[k]:.1%}" for k, label in KEYS if k in r)
                  + f" ({r['seconds']:.0f} s)", flush=True)
            per_seed.append(r)
        results[init] = {"per_seed": per_seed, "summary": summary(per_seed)}
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
