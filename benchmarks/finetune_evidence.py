"""Evidence that the ``lora`` and ``dpo`` stages work, on the digits demo, measured from samples.

    python benchmarks/finetune_evidence.py                 # both experiments (~20 minutes on 2 CPU cores)
    python benchmarks/finetune_evidence.py --only lora     # or --only dpo
    python benchmarks/finetune_evidence.py --build-base    # first train the quickstart base (5 minutes) if missing
    python benchmarks/finetune_evidence.py --only lora --lora-set lora.adapter.rank=4 --lora-set run.name=lora-r4

Both start from the quickstart run (``runs/quickstart``: its exported DiT, autoencoder and text encoder). The same
experiments over several seeds of the whole chain (base included): ``benchmarks/evidence.py``, which calls
:func:`lora_experiment` and :func:`dpo_experiment` with a :class:`Chain` per seed.

**(a) LoRA learns a concept the base never saw.** Training data: the demo's training digits mirrored left–right,
captioned "a mirrored handwritten digit three", mixed 1:1 with the ordinary digits and captions (prior
preservation: the word carries the concept). ``loom train --config lora-mirrored`` trains a rank-16 adapter on the
DiT's attention, feed-forward and input/output projections. A 20-class reader (digit × mirrored?, an RBF SVM on
8×8 pooled pixels, fit on the demo training split and its mirror image) then reads samples of the base model and
of base + adapter for the same prompts and seeds. Digits 0, 1 and 8 look alike mirrored, so the mirrored-or-not
rate is measured on the other seven.

**(b) DPO raises a rule-based reward on held-out prompts.** The stated rule standing in for human preference:
*more ink wins* (thicker strokes: the mean brightness of the white-on-black image). Pairs are two base-model samples
of one prompt; the brighter wins; near-equal pairs are ties (dropped by ``dpo.ties: drop``). The pairs of digits
1, 4 and 7 are held out. They go through ``loom shards pairs`` (plus two broken rows, to show the skip counts) and
``loom train --config dpo-thick``, a LoRA Diffusion-DPO run; ``--config dpo-thick-sft`` trains the supervised
(winner-only) baseline on the same pairs. For the held-out prompts, samples of the fine-tuned model are compared
with the base model's at the same seeds: the win rate on ink, and digit accuracy (the quickstart report's digit
classifier) of both.

**Memory.** Parameter bytes held by a LoRA fine-tune, a LoRA-DPO run (one base copy: reference = adapters off) and
a full-weight DPO run (policy + frozen reference copy), counted from the stages themselves.

Prints every number and writes them to ``runs/finetune_evidence.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipeline.demo import DIGIT_WORDS, caption_for_digit, load_digits_split  # noqa: E402
from data_pipeline.sources import Sample, SkipLog  # noqa: E402
from data_pipeline.writer import WriterOptions, write_shards  # noqa: E402
from training.evaluation import DigitClassifier, save_grid, to_uint8  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE_RUN = Path("runs/quickstart")
MIRRORED_DIR = Path("data/mirrored")
PREFS_DIR = Path("data/prefs-thick")
SEED_STRIDE = 100_003  # sampling seeds of chain seed s: the seed-0 value + s * SEED_STRIDE (no overlap between seeds)
ASYMMETRIC = (2, 3, 4, 5, 6, 7, 9)  # digits whose mirror image differs from the digit
HELD_OUT = (1, 4, 7)  # DPO: prompts never seen in training pairs
TIE_INK = 0.002  # |ink_0 - ink_1| below this: a tie
log = logging.getLogger("finetune_evidence")


def mirrored_caption(d: int) -> str:
    return f"a mirrored handwritten digit {DIGIT_WORDS[d]}"


@dataclasses.dataclass(frozen=True)
class Chain:
    """Where one seed's chain lives: the base run the fine-tunes start from, their data and their run directories.
    The defaults are the single-seed layout (``runs/quickstart``, ``data/...``, ``runs/<config name>``)."""

    base_run: Path = BASE_RUN  # the quickstart-style run: exported DiT, autoencoder, text encoder
    demo_dir: Path = Path("data/demo")  # the demo shards the base was trained on (its split seed = seed)
    mirrored_dir: Path = MIRRORED_DIR  # the mirrored digits written for the LoRA experiment
    prefs_dir: Path = PREFS_DIR  # the preference pairs written for the DPO experiment
    output_dir: Path = Path("runs")  # run.output_dir of the fine-tunes (runs/lora-mirrored, runs/dpo-thick, ...)
    seed: int = 0  # run.seed and data.seed of the fine-tunes, the demo split seed, the offset of sampling seeds
    lora_overrides: tuple[str, ...] = ()  # extra `key=value` overrides of configs/lora-mirrored.yaml (tuning)

    def sample_seed(self, seed0: int) -> int:
        """The sampling seed that is ``seed0`` for chain seed 0."""
        return seed0 + SEED_STRIDE * self.seed

    def base_overrides(self) -> list[str]:
        """Overrides pointing a fine-tune config at this chain's base, output directory and seed."""
        b = self.base_run
        return [f"diffusion.weights={b / 'diffusion/export/model.safetensors'}",
                f"diffusion.autoencoder_weights={b / 'autoencoder/export/model.safetensors'}",
                f"diffusion.text_encoder.checkpoint={b / 'text_encoder.safetensors'}",
                f"run.output_dir={self.output_dir}", f"run.seed={self.seed}", f"data.seed={self.seed}"]

    def lora_config_overrides(self) -> list[str]:
        sources = [{"urls": f"{self.mirrored_dir}/train-*.tar", "name": "mirrored"},
                   {"urls": f"{self.demo_dir}/train-{{000000..000001}}.tar", "name": "plain"}]
        return [*self.base_overrides(), f"data.sources={json.dumps(sources)}",
                f"val_data.urls={self.mirrored_dir}/val-000000.tar", *self.lora_overrides]

    def dpo_config_overrides(self) -> list[str]:
        return [*self.base_overrides(), f"dpo.data.urls={self.prefs_dir}/train-*.tar",
                f"dpo.val_data.urls={self.prefs_dir}/val-*.tar"]

    def run_dir(self, config: str, overrides: list[str]) -> Path:
        """The run directory ``loom train --config CONFIG OVERRIDES`` writes to."""
        from training.config_io import load_config
        from training.run_config import RunConfig

        return Path(load_config(RunConfig, [config], overrides).run.directory)


# ------------------------------------------------------------------------------------------------------ data


def write_mirrored_shards(out: Path = MIRRORED_DIR, seed: int = 0) -> dict[str, int]:
    """The demo split's images flipped left-right, captioned "a mirrored handwritten digit ..."."""
    xtr, ytr, xva, yva = load_digits_split(seed)
    counts = {}
    for split, images, labels in (("train", xtr, ytr), ("val", xva, yva)):
        samples = [Sample(np.ascontiguousarray(img[:, ::-1]), mirrored_caption(int(y)),
                          {"label": int(y), "mirrored": True}, f"mirrored/{split}/{i}")
                   for i, (img, y) in enumerate(zip(images, labels))]
        summary = write_shards(samples, out, split, WriterOptions(1000, image_format="png", overwrite=True),
                               skips=SkipLog(), total=len(samples))
        counts[split] = summary.samples
    return counts


def ink(images: torch.Tensor) -> np.ndarray:
    """The reward: mean brightness in [0, 1] of white-on-black images ``(B, C, H, W)`` in [-1, 1]."""
    return ((images.float().clamp(-1, 1) + 1) / 2).mean(dim=(1, 2, 3)).cpu().numpy()


class MirrorReader:
    """Reads (digit, mirrored?) from 32x32 samples: a 20-class RBF SVM on the digit classifier's features."""

    def __init__(self, seed: int = 0):
        xtr, ytr, xva, yva = load_digits_split(seed)
        self.model = DigitClassifier()
        flip = lambda x: np.ascontiguousarray(x[:, :, ::-1])  # noqa: E731 - (N, H, W, C): flip W
        self.model.fit(np.concatenate([xtr, flip(xtr)]), np.concatenate([ytr, ytr + 10]))
        keep = np.isin(yva, ASYMMETRIC)
        pred = self.model.predict(np.concatenate([xva[keep], flip(xva[keep])]))
        truth = np.concatenate([yva[keep], yva[keep] + 10])
        self.val_accuracy = float((pred == truth).mean())
        self.val_mirror_accuracy = float(((pred >= 10) == (truth >= 10)).mean())

    def read(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(digit, mirrored) per image."""
        pred = self.model.predict(images)
        return pred % 10, pred >= 10


# ----------------------------------------------------------------------------------------------- the models


def base_pipeline(run_dir: Path = BASE_RUN) -> Any:
    """The quickstart run opened for inference with its exported EMA weights, on the CPU."""
    from training.builders import open_run

    return open_run(run_dir, weights="export", device="cpu")


def with_adapter(pipe: Any, adapter: Path, scale: float = 1.0) -> torch.nn.Module:
    """A copy of the base denoiser with ``adapter`` merged in."""
    from training.finetune import attach_adapters, load_adapter, merge_adapters

    model = attach_adapters(copy.deepcopy(pipe.denoiser), [(load_adapter(adapter), scale)])
    merge_adapters(model)
    return model


@torch.no_grad()
def draw(pipe: Any, model: torch.nn.Module, prompts: list[str], seed: int, guidance: float = 3.0,
         steps: int = 25, chunk: int = 250) -> torch.Tensor:
    """Samples for ``prompts``; the i-th prompt's starting noise depends only on (seed, i // chunk, i % chunk)."""
    out = []
    with_model = dataclasses.replace(pipe, denoiser=model)
    for k in range(0, len(prompts), chunk):
        sampling = dataclasses.replace(pipe.sampling, seed=seed + k, steps=steps, sampler="ddim")
        out.append(with_model.generate(prompts[k:k + chunk], guidance=guidance, sampling=sampling))
    return torch.cat(out)


def train(config: str, stage: str, *overrides: str) -> None:
    """``loom train --config CONFIG OVERRIDES`` from scratch (the stage's own checkpoints are ignored)."""
    from launch.cli import main

    code = main(["train", "--config", config, f"{stage}.train.resume=none", *overrides])
    if code:
        raise SystemExit(f"loom train --config {config} failed with exit code {code}")


# ------------------------------------------------------------------------------------------------ (a) LoRA


def lora_experiment(results: dict, n_per_digit: int, skip_train: bool, chain: Chain = Chain()) -> None:
    t0, cpu0 = time.perf_counter(), time.process_time()
    counts = write_mirrored_shards(chain.mirrored_dir, chain.seed)
    print(f"[lora] mirrored digits written to {chain.mirrored_dir}: {counts}")
    overrides = chain.lora_config_overrides()
    run_dir = chain.run_dir("lora-mirrored", overrides)
    if not skip_train:
        train("lora-mirrored", "lora", *overrides)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    adapter = run_dir / "lora/export/adapter.safetensors"
    meta = json.loads(adapter.with_suffix(".json").read_text())
    reader = MirrorReader(chain.seed)
    print(f"[lora] adapter {adapter}: {meta['parameters']:,} parameters, {meta['file_bytes'] / 1024:.0f} KiB; "
          f"base weights unchanged (fingerprint re-checked at export): {meta['base_unchanged_verified']}")
    print(f"[lora] reader (digit x mirrored) on held-out real digits {ASYMMETRIC}: {reader.val_accuracy:.1%} "
          f"(mirrored-or-not alone: {reader.val_mirror_accuracy:.1%})")

    pipe = base_pipeline(chain.base_run)
    lora_model = with_adapter(pipe, adapter)
    digits = np.repeat(np.array(ASYMMETRIC), n_per_digit)
    out: dict[str, Any] = {"adapter_parameters": meta["parameters"], "adapter_file_bytes": meta["file_bytes"],
                           "base_unchanged_verified": meta["base_unchanged_verified"],
                           "reader_val_accuracy": reader.val_accuracy,
                           "reader_val_mirror_accuracy": reader.val_mirror_accuracy, "train_seconds": train_s,
                           "train_cpu_seconds": train_cpu_s,
                           "adapter_config": meta.get("adapter"), "overrides": list(chain.lora_overrides)}
    rows = []
    for name, model in (("base", pipe.denoiser), ("lora", lora_model)):
        for kind, caption in (("mirrored prompt", mirrored_caption), ("plain prompt", caption_for_digit)):
            images = draw(pipe, model, [caption(int(d)) for d in digits], seed=chain.sample_seed(100))
            pred_digit, pred_mirror = reader.read(images)
            three = digits == 3
            entry = {"mirrored": float(pred_mirror.mean()), "right_digit": float((pred_digit == digits).mean()),
                     "mirrored_and_right": float((pred_mirror & (pred_digit == digits)).mean()),
                     "three_mirrored": float(pred_mirror[three].mean()),
                     "three_right_digit": float((pred_digit[three] == 3).mean())}
            out[f"{name}/{kind}"] = entry
            rows.append((name, kind, entry))
            if kind == "mirrored prompt":
                save_grid(images, run_dir / "evidence" / f"{name}_mirrored_prompt.png",
                          nrow=n_per_digit, scale=2)
    print(f"[lora] samples: {n_per_digit} per digit {ASYMMETRIC} at guidance 3, same seeds for both models")
    print("[lora] | model | prompt | read as mirrored | right digit | mirrored & right | 'three': mirrored, right |")
    for name, kind, e in rows:
        print(f"[lora] | {name} | {kind} | {e['mirrored']:.1%} | {e['right_digit']:.1%} | "
              f"{e['mirrored_and_right']:.1%} | {e['three_mirrored']:.0%}, {e['three_right_digit']:.0%} |")
    results["lora"] = out


# ------------------------------------------------------------------------------------------------- (b) DPO


def write_preference_pairs(pipe: Any, pairs_per_digit: int, seed: int = 7,
                           prefs_dir: Path = PREFS_DIR) -> dict[str, Any]:
    """Base-model sample pairs ranked by ink, as image files + JSONL tables, then Pick-a-Pic shards."""
    from PIL import Image

    from launch.cli import main

    img_dir = prefs_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    digits = np.repeat(np.arange(10), 2 * pairs_per_digit)
    images = draw(pipe, pipe.denoiser, [caption_for_digit(int(d)) for d in digits], seed=seed)
    arr = to_uint8(images)
    rewards = ink(images)
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    ties = 0
    for i in range(0, len(digits), 2):
        d = int(digits[i])
        names = []
        for j in (i, i + 1):
            name = f"images/{d}_{j:05d}.png"
            Image.fromarray(arr[j]).save(prefs_dir / name)
            names.append(name)
        gap = float(rewards[i] - rewards[i + 1])
        label = 0.5 if abs(gap) < TIE_INK else (1.0 if gap > 0 else 0.0)
        ties += label == 0.5
        split = "val" if d in HELD_OUT else "train"
        rows[split].append({"caption": caption_for_digit(d), "jpg_0": names[0], "jpg_1": names[1], "label_0": label,
                            "ink_0": float(rewards[i]), "ink_1": float(rewards[i + 1]), "digit": d})
    # Two broken rows, to show that bad pairs are skipped and counted: a missing file and a corrupt one.
    (img_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    rows["train"].append({"caption": caption_for_digit(2), "jpg_0": "images/missing.png", "jpg_1": names[0],
                          "label_0": 1.0})
    rows["train"].append({"caption": caption_for_digit(3), "jpg_0": names[0], "jpg_1": "images/corrupt.png",
                          "label_0": 0.0})
    summary = {"pairs_generated": len(digits) // 2, "ties": ties}
    for split, table in rows.items():
        path = prefs_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in table))
        code = main(["shards", "pairs", f"input={path}", f"output_dir={prefs_dir}", f"prefix={split}",
                     "overwrite=true", "progress=false"])
        if code:
            raise SystemExit(f"loom shards pairs failed for {path}")
        index = json.loads((prefs_dir / f"{split}.shardindex.json").read_text())
        summary[f"{split}_pairs_written"] = index["total_samples"]
        summary[f"{split}_skipped"] = index["skipped"]
    return summary


def dpo_experiment(results: dict, n_per_digit: int, pairs_per_digit: int, skip_train: bool,
                   skip_data: bool = False, chain: Chain = Chain()) -> None:
    pipe = base_pipeline(chain.base_run)
    t0 = time.perf_counter()
    prefs = chain.prefs_dir
    if skip_data and (prefs / "train.shardindex.json").exists():
        data = {split: json.loads((prefs / f"{split}.shardindex.json").read_text())["total_samples"]
                for split in ("train", "val")}
    else:
        data = write_preference_pairs(pipe, pairs_per_digit, chain.sample_seed(7), prefs)
    print(f"[dpo] preference pairs (more ink wins; held-out digits {HELD_OUT} in val): {data}")
    runs = {"dpo": "dpo-thick", "sft": "dpo-thick-sft"}
    overrides = chain.dpo_config_overrides()
    run_dirs = {name: chain.run_dir(config, overrides) for name, config in runs.items()}
    timings = {}
    for name, config in runs.items():
        t1 = time.perf_counter()
        if not skip_train:
            train(config, "dpo", *overrides)
        timings[name] = time.perf_counter() - t1
    clf, clf_acc = DigitClassifier.for_demo(chain.seed)
    out: dict[str, Any] = {"data": data, "classifier_val_accuracy": clf_acc, "seconds": timings,
                           "data_seconds": time.perf_counter() - t0 - sum(timings.values())}
    for split, digit_set in (("held-out prompts", HELD_OUT), ("training prompts",
                                                               tuple(d for d in range(10) if d not in HELD_OUT))):
        digits = np.repeat(np.array(digit_set), n_per_digit)
        prompts = [caption_for_digit(int(d)) for d in digits]
        base_images = draw(pipe, pipe.denoiser, prompts, seed=chain.sample_seed(1000))
        base_ink = ink(base_images)
        base_acc = float((clf.predict(base_images) == digits).mean())
        entry: dict[str, Any] = {"samples": len(digits), "base_ink": float(base_ink.mean()), "base_accuracy": base_acc}
        for name in runs:
            run_dir = run_dirs[name]
            logs = json.loads((run_dir / "dpo" / "export" / "adapter.json").read_text())
            model = with_adapter(pipe, run_dir / "dpo" / "export" / "adapter.safetensors")
            images = draw(pipe, model, prompts, seed=chain.sample_seed(1000))
            tuned_ink = ink(images)
            entry[name] = {"win_rate": float((tuned_ink > base_ink).mean()), "ink": float(tuned_ink.mean()),
                           "accuracy": float((clf.predict(images) == digits).mean()),
                           "objective": logs.get("objective")}
            if split == "held-out prompts":
                save_grid(torch.cat([base_images[::n_per_digit // 4 or 1][:12], images[::n_per_digit // 4 or 1][:12]]),
                          run_dir / "evidence" / "base_vs_tuned_heldout.png", nrow=12, scale=2)
        out[split] = entry
    for split in ("held-out prompts", "training prompts"):
        e = out[split]
        print(f"[dpo] {split}: {e['samples']} samples, base ink {e['base_ink']:.4f}, base digit accuracy "
              f"{e['base_accuracy']:.1%}")
        for name in runs:
            r = e[name]
            print(f"[dpo]   {name}: beats base at the same seed in {r['win_rate']:.1%} of pairs; ink {r['ink']:.4f}; "
                  f"digit accuracy {r['accuracy']:.1%} ({100 * (r['accuracy'] - e['base_accuracy']):+.1f} points)")
    results["dpo"] = out


# ----------------------------------------------------------------------------------------------- memory


def memory_comparison(results: dict, base_run: Path = BASE_RUN) -> None:
    """Parameter bytes held by each fine-tuning stage (trainable module + frozen modules), from the real stages."""
    from training.builders import frozen_parts, run_config_of, square
    from training.config_io import load_config
    from training.finetune import parameter_bytes
    from training.run_config import RunConfig
    from training.stages.dpo import make_dpo_stage
    from training.stages.lora import finetune_diffusion_config, make_lora_stage

    cfg = run_config_of(base_run)
    te, ae = frozen_parts(cfg, base_run)
    shape = square(cfg.data.resolution)
    dcfg = finetune_diffusion_config(cfg.diffusion, str(base_run / "diffusion/export/model.safetensors"), None, [])

    def held(stage: Any) -> int:
        return parameter_bytes(stage.trainable(), *stage.frozen_modules().values())

    adapter = load_config(RunConfig, ["dpo-thick"]).dpo.adapter  # the same adapter for both: dpo-thick's
    lora = make_lora_stage(dcfg, dataclasses.replace(cfg.lora, adapter=adapter), te, ae, shape)
    dpo_lora = make_dpo_stage(dcfg, dataclasses.replace(cfg.dpo, policy="lora", adapter=adapter), te, ae, shape)
    dpo_full = make_dpo_stage(dcfg, dataclasses.replace(cfg.dpo, policy="full"), te, ae, shape)
    adapters = sum(p.numel() * p.element_size() for p in lora.model.parameters() if p.requires_grad)
    denoiser = parameter_bytes(lora.model) - adapters
    out = {"lora_finetune": held(lora), "lora_dpo": held(dpo_lora), "full_dpo": held(dpo_full),
           "denoiser": denoiser, "adapters": adapters}
    print(f"[memory] parameter bytes held (denoiser {denoiser:,}, rank-{adapter.rank} adapters on "
          f"{'+'.join(adapter.targets)} {adapters:,}, plus the frozen text "
          f"encoder and autoencoder): LoRA fine-tune {out['lora_finetune']:,}; LoRA-DPO {out['lora_dpo']:,} "
          f"(difference {out['lora_dpo'] - out['lora_finetune']:,}); full-weight DPO {out['full_dpo']:,} "
          f"(= LoRA-DPO - adapters + a second denoiser: {out['full_dpo'] - out['lora_dpo']:+,})")
    results["memory"] = out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["lora", "dpo", "memory"], default=None)
    parser.add_argument("--samples-per-digit", type=int, default=40)
    parser.add_argument("--pairs-per-digit", type=int, default=96)
    parser.add_argument("--skip-train", action="store_true", help="measure the existing runs again")
    parser.add_argument("--skip-data", action="store_true", help="reuse the preference shards already written")
    parser.add_argument("--build-base", action="store_true", help="train the quickstart base first if missing")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default; 1 is faster on a busy machine)")
    parser.add_argument("--lora-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of configs/lora-mirrored.yaml (repeatable; e.g. lora.adapter.rank=16 "
                             "run.name=lora-r16)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import os

    os.chdir(ROOT)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (BASE_RUN / "diffusion" / "export" / "model.safetensors").exists():
        if not args.build_base:
            print(f"no base model at {BASE_RUN}: run `make quickstart` first (or pass --build-base)", file=sys.stderr)
            return 1
        from launch.cli import main as loom

        loom(["shards", "demo", "output_dir=data/demo", "overwrite=true"])
        loom(["train", "--config", "quickstart"])
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
                                          f"torch {torch.__version__}", "load_average_at_start": os.getloadavg()}
    start = time.perf_counter()
    if args.only in (None, "memory"):
        memory_comparison(results)
    if args.only in (None, "lora"):
        lora_experiment(results, args.samples_per_digit, args.skip_train, Chain(lora_overrides=tuple(args.lora_set)))
    if args.only in (None, "dpo"):
        dpo_experiment(results, args.samples_per_digit, args.pairs_per_digit, args.skip_train, args.skip_data)
    results["seconds"] = time.perf_counter() - start
    out = Path("runs/finetune_evidence.json")
    out.parent.mkdir(exist_ok=True)
    merged = json.loads(out.read_text()) if out.exists() and args.only else {}  # --only: update that part
    out.write_text(json.dumps({**merged, **results}, indent=1))
    print(f"all numbers in runs/finetune_evidence.json ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
