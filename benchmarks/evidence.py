"""Learning evidence over seeds: the whole chain — quickstart base, LoRA fine-tune, DPO fine-tune — once per seed,
every figure reported per seed, as mean and as minimum.

    python benchmarks/evidence.py --seeds 3 --threads 1           # seeds 0, 1, 2 (~20 min a seed on 2 CPU cores)
    python benchmarks/evidence.py --seeds 3 --threads 1 --stages base        # only the bases
    python benchmarks/evidence.py --seeds 3 --threads 1 --stages lora,dpo    # fine-tunes from the existing bases
    python benchmarks/evidence.py --seeds 3 --table-only          # re-write the JSON and table from stored results

For seed ``s`` everything lives under ``runs/evidence/seed-s/``:

* ``data/demo`` — the demo shards with train/val split seed ``s`` (``loom shards demo seed=s``);
* ``quickstart`` — ``loom train --config quickstart`` with ``run.seed=s data.seed=s`` (autoencoder → cache →
  diffusion → report: reconstruction PSNR, digit accuracy at guidance 3 and 0, the report's classifier fit on the
  same split);
* ``lora-mirrored``, ``dpo-thick``, ``dpo-thick-sft`` and their data — ``benchmarks/finetune_evidence.py``'s two
  experiments started from that base, with ``run.seed=data.seed=s`` and sampling seeds offset by ``s``.

Seed 0 with the default thread count is ``make quickstart`` (same config, seeds and split). A stage whose stored
result carries the same stamp (the resolved config, the thread count, the sample counts, and for the fine-tunes the
base's stamp) is reused rather than trained again; ``--force`` re-runs the named stages anyway.

Writes ``runs/evidence/evidence.json`` (every per-seed number, mean, minimum and maximum) and
``runs/evidence/evidence.md`` (the table for ``benchmarks/RESULTS.md``). Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("base", "lora", "dpo")
DEFAULT_ROOT = Path("runs/evidence")


@dataclasses.dataclass(frozen=True)
class Metric:
    """One published learning figure: where it sits in a seed's results and how to print it."""

    key: str  # the name in evidence.json
    label: str  # the row label of the table
    stage: str  # base, lora or dpo: the stage whose results hold it
    path: tuple[str, ...]  # keys into that stage's result dict
    unit: str = "%"  # "%" (a fraction printed as a percentage), "pp" (a fraction difference, points), "dB", "s"


METRICS: tuple[Metric, ...] = (
    Metric("psnr_db", "autoencoder reconstruction PSNR", "base", ("autoencoder_psnr_db",), "dB"),
    Metric("guided_accuracy", "digit accuracy, guidance 3", "base", ("digit_accuracy_guidance_3",)),
    Metric("unguided_accuracy", "digit accuracy, guidance 0 (chance 10%)", "base", ("digit_accuracy_guidance_0",)),
    Metric("lora_mirrored_and_right", "LoRA: mirrored and right digit (mirrored prompt)", "lora",
           ("lora/mirrored prompt", "mirrored_and_right")),
    Metric("lora_mirrored", "LoRA: read as mirrored (mirrored prompt)", "lora", ("lora/mirrored prompt", "mirrored")),
    Metric("lora_right_digit", "LoRA: right digit (mirrored prompt)", "lora", ("lora/mirrored prompt", "right_digit")),
    Metric("lora_plain_right_digit", "LoRA: right digit (plain prompt)", "lora", ("lora/plain prompt", "right_digit")),
    Metric("lora_plain_mirrored", "LoRA: read as mirrored (plain prompt)", "lora", ("lora/plain prompt", "mirrored")),
    Metric("base_mirrored_and_right", "base: mirrored and right digit (mirrored prompt)", "lora",
           ("base/mirrored prompt", "mirrored_and_right")),
    Metric("dpo_win_rate", "DPO: beats the base on ink (held-out prompts)", "dpo",
           ("held-out prompts", "dpo", "win_rate")),
    Metric("dpo_accuracy_change", "DPO: digit accuracy change (held-out prompts)", "dpo",
           ("held-out prompts", "dpo_accuracy_change"), "pp"),
    Metric("sft_win_rate", "SFT on winners: beats the base on ink (held-out prompts)", "dpo",
           ("held-out prompts", "sft", "win_rate")),
    Metric("base_seconds", "base: wall time (busy machine)", "base", ("seconds",), "s"),
    Metric("lora_train_seconds", "LoRA: data + training wall time (busy machine)", "lora", ("train_seconds",), "s"),
    Metric("lora_train_cpu_seconds", "LoRA: data + training CPU time (main process)", "lora",
           ("train_cpu_seconds",), "s"),
)


# ------------------------------------------------------------------------------------- aggregation and table


def lookup(results: dict[str, Any], path: Sequence[str]) -> Optional[float]:
    """``results[path[0]][path[1]]...`` as a float, or None when any key is missing."""
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return None if node is None else float(node)


def aggregate(per_seed: dict[int, dict[str, dict[str, Any]]],
              metrics: Sequence[Metric] = METRICS) -> dict[str, dict[str, Any]]:
    """``{metric key: {"values": {seed: value}, "mean", "min", "max", "seeds"}}`` from per-seed stage results
    (``per_seed[seed][stage]``); a seed without the metric's stage is left out of that metric (``seeds`` counts
    the rest), a metric no seed has is absent."""
    out: dict[str, dict[str, Any]] = {}
    for m in metrics:
        values = {}
        for seed in sorted(per_seed):
            v = lookup(per_seed[seed].get(m.stage) or {}, m.path)
            if v is not None:
                values[seed] = v
        if values:
            vs = list(values.values())
            out[m.key] = {"label": m.label, "unit": m.unit, "values": values, "seeds": len(vs),
                          "mean": sum(vs) / len(vs), "min": min(vs), "max": max(vs)}
    return out


def fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "pp":
        return f"{100 * value:+.1f} pts"
    if unit == "dB":
        return f"{value:.2f} dB"
    return f"{value:.0f} s"


def markdown_table(summary: dict[str, dict[str, Any]], seeds: Sequence[int]) -> str:
    """The table for RESULTS: one row per metric, one column per seed, then mean, minimum and maximum (— where a
    seed lacks the metric; the statistics are over the seeds that have it, counted in the last column)."""
    head = ["figure", *[f"seed {s}" for s in seeds], "mean", "min", "max", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for entry in summary.values():
        cells = [fmt(entry["values"][s], entry["unit"]) if s in entry["values"] else "—" for s in seeds]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + f" | **{fmt(entry['mean'], entry['unit'])}** | "
                     f"{fmt(entry['min'], entry['unit'])} | {fmt(entry['max'], entry['unit'])} | {entry['seeds']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- stamps


def stamp_of(*parts: Any) -> str:
    """A short hash of what decides a stage's result (resolved config text, thread count, sample counts, ...)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolved_yaml(config: str, overrides: Sequence[str]) -> str:
    from training.config_io import load_config, to_yaml
    from training.run_config import RunConfig

    return to_yaml(load_config(RunConfig, [config], list(overrides)))


def stored(path: Path, stamp: str) -> Optional[dict[str, Any]]:
    """The stage result stored at ``path`` when its stamp is ``stamp``."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data if data.get("stamp") == stamp else None


# ------------------------------------------------------------------------------------------------- one seed


@dataclasses.dataclass
class SeedChain:
    """One seed's chain under ``root/seed-<seed>``."""

    root: Path  # the evidence directory (runs/evidence)
    seed: int  # run.seed, data.seed and demo split seed of every stage
    threads: int  # torch intra-op threads (part of every stamp: results depend on it)

    @property
    def dir(self) -> Path:
        return self.root / f"seed-{self.seed}"

    @property
    def demo_dir(self) -> Path:
        return self.dir / "data" / "demo"

    @property
    def base_run(self) -> Path:
        return self.dir / "quickstart"

    def base_overrides(self) -> list[str]:
        demo = self.demo_dir
        return [f"run.output_dir={self.dir}", f"run.seed={self.seed}", f"data.seed={self.seed}",
                f"data.urls={demo}/train-{{000000..000001}}.tar", f"val_data.urls={demo}/val-000000.tar"]

    def finetune_chain(self) -> Any:
        from benchmarks.finetune_evidence import Chain

        return Chain(base_run=self.base_run, demo_dir=self.demo_dir, mirrored_dir=self.dir / "data" / "mirrored",
                     prefs_dir=self.dir / "data" / "prefs-thick", output_dir=self.dir, seed=self.seed)

    def base_stamp(self) -> str:
        import torch

        return stamp_of("base", resolved_yaml("quickstart", self.base_overrides()), self.threads, torch.__version__)


def run_base(sc: SeedChain, force: bool) -> dict[str, Any]:
    """The seed's demo shards and quickstart run (reused when its stamp matches); its report's numbers.

    An interrupted base with the same stamp (``base.pending.json``) is resumed (``loom train`` continues every stage
    from its last checkpoint); any other run directory there is removed and trained from scratch."""
    from launch.cli import main as loom

    stamp = sc.base_stamp()
    path = sc.dir / "base.json"
    done = None if force else stored(path, stamp)
    if done is not None and (sc.base_run / "diffusion/export/model.safetensors").exists():
        print(f"[evidence] seed {sc.seed}: base reused ({sc.base_run}, stamp {stamp})")
        return done
    pending = sc.dir / "base.pending.json"
    resume = not force and stored(pending, stamp) is not None and (sc.demo_dir / "train.shardindex.json").exists()
    t0 = time.perf_counter()
    if not resume:
        if sc.base_run.exists():
            shutil.rmtree(sc.base_run)
        if loom(["shards", "demo", f"output_dir={sc.demo_dir}", f"seed={sc.seed}", "overwrite=true",
                 "progress=false"]):
            raise SystemExit(f"loom shards demo failed for seed {sc.seed}")
        pending.write_text(json.dumps({"stamp": stamp}))
    print(f"[evidence] seed {sc.seed}: base {'resumed' if resume else 'trained'} in {sc.base_run}")
    if loom(["train", "--config", "quickstart", *sc.base_overrides()]):
        raise SystemExit(f"loom train --config quickstart failed for seed {sc.seed}")
    report = json.loads((sc.base_run / "report.json").read_text())
    seconds = None if resume else time.perf_counter() - t0  # a resumed run's time is not the whole base's
    out = {**report, "seconds": seconds, "resumed": resume, "stamp": stamp,
           "command": "loom train --config quickstart " + " ".join(sc.base_overrides())}
    path.write_text(json.dumps(out, indent=1))
    return out


def finetune_stamp(sc: SeedChain, stage: str, samples_per_digit: int, pairs_per_digit: int, base_stamp: str) -> str:
    """The stamp of a fine-tune's result: its resolved config(s), sample counts, the base's stamp, threads."""
    chain = sc.finetune_chain()
    if stage == "lora":
        return stamp_of(stage, resolved_yaml("lora-mirrored", chain.lora_config_overrides()), (samples_per_digit,),
                        base_stamp, sc.threads)
    over = chain.dpo_config_overrides()
    return stamp_of(stage, resolved_yaml("dpo-thick", over) + resolved_yaml("dpo-thick-sft", over),
                    (samples_per_digit, pairs_per_digit), base_stamp, sc.threads)


def run_finetune(sc: SeedChain, stage: str, force: bool, samples_per_digit: int, pairs_per_digit: int,
                 base_stamp: str) -> dict[str, Any]:
    """The LoRA or DPO experiment of ``finetune_evidence.py`` from this seed's base (reused when its stamp
    matches)."""
    import benchmarks.finetune_evidence as fe

    chain = sc.finetune_chain()
    stamp = finetune_stamp(sc, stage, samples_per_digit, pairs_per_digit, base_stamp)
    path = sc.dir / f"{stage}.json"
    done = None if force else stored(path, stamp)
    if done is not None:
        print(f"[evidence] seed {sc.seed}: {stage} reused ({path}, stamp {stamp})")
        return done
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    if stage == "lora":
        fe.lora_experiment(results, samples_per_digit, False, chain)
    else:
        fe.dpo_experiment(results, samples_per_digit, pairs_per_digit, False, False, chain)
        held = results["dpo"]["held-out prompts"]
        held["dpo_accuracy_change"] = held["dpo"]["accuracy"] - held["base_accuracy"]
        held["sft_accuracy_change"] = held["sft"]["accuracy"] - held["base_accuracy"]
    out = {**results[stage], "seconds": time.perf_counter() - t0, "stamp": stamp}
    path.write_text(json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------------------------------------------ main


def write_outputs(root: Path, seeds: Sequence[int], per_seed: dict[int, dict[str, Any]], meta: dict[str, Any]) -> str:
    summary = aggregate(per_seed)
    (root / "evidence.json").write_text(json.dumps({**meta, "seeds": list(seeds), "per_seed": per_seed,
                                                    "summary": summary}, indent=1))
    table = markdown_table(summary, seeds)
    (root / "evidence.md").write_text(f"{meta['header']}\n\n{table}")
    return table


def load_stored(sc: SeedChain, samples_per_digit: int, pairs_per_digit: int) -> dict[str, Any]:
    """The stage results stored for a seed whose stamps still match the current configs and settings."""
    out: dict[str, Any] = {}
    base = stored(sc.dir / "base.json", sc.base_stamp())
    if base is None:
        return out
    out["base"] = base
    for stage in ("lora", "dpo"):
        got = stored(sc.dir / f"{stage}.json", finetune_stamp(sc, stage, samples_per_digit, pairs_per_digit,
                                                              base["stamp"]))
        if got is not None:
            out[stage] = got
    return out


def parse_stages(text: str, error: Callable[[str], Any]) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        error(f"--stages {text!r}: expected a comma-separated subset of {','.join(STAGES)}")
    return stages


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (first-seed, first-seed + 1, ...)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--stages", default="base,lora,dpo", help="comma-separated subset of base,lora,dpo to run "
                        "(a fine-tune needs its seed's base: run or reused)")
    parser.add_argument("--force", action="store_true", help="re-run the named stages even when a result is stored")
    parser.add_argument("--table-only", action="store_true", help="only aggregate the stored results")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the seeds' runs and results go")
    parser.add_argument("--samples-per-digit", type=int, default=40)
    parser.add_argument("--pairs-per-digit", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (part of every stamp)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the stages in this process (default: each seed's stage in a fresh child process, "
                             "so that one stage's imports never mix with code edited while an earlier one ran)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one stage for a parent run
    args = parser.parse_args(argv)
    args.in_process = args.in_process or args.child
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: expected at least 1")
    stages = parse_stages(args.stages, parser.error)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(args.threads)
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    command = " ".join(["python benchmarks/evidence.py", *(argv if argv is not None else sys.argv[1:])])
    meta = {"command": command, "date": datetime.date.today().isoformat(),
            "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
                       f"torch {torch.__version__}",
            "load_average_at_start": os.getloadavg()}
    meta["header"] = (f"`{command}` — {meta['date']}, {meta['machine']} (load average at start "
                      f"{meta['load_average_at_start'][0]:.1f}; timings from a machine shared with other work)")
    chains = [SeedChain(root, s, args.threads) for s in seeds]
    per_seed = {sc.seed: load_stored(sc, args.samples_per_digit, args.pairs_per_digit) for sc in chains}
    if not args.table_only:
        for sc in chains:
            sc.dir.mkdir(parents=True, exist_ok=True)
            for stage in STAGES:
                if stage not in stages:
                    continue
                base = per_seed[sc.seed].get("base")
                if stage != "base" and base is None:
                    print(f"[evidence] seed {sc.seed}: no base with the current config at {sc.base_run}; "
                          f"run --stages base first (skipping {stage})", file=sys.stderr)
                    continue
                if not args.in_process:
                    child = [sys.executable, str(Path(__file__).resolve()), "--child", "--seeds", "1",
                             "--first-seed", str(sc.seed), "--stages", stage, "--root", str(root),
                             "--threads", str(args.threads), "--samples-per-digit", str(args.samples_per_digit),
                             "--pairs-per-digit", str(args.pairs_per_digit), *(["--force"] if args.force else [])]
                    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                    if subprocess.run(child, env=env).returncode:
                        print(f"[evidence] seed {sc.seed}: {stage} failed (see above)", file=sys.stderr)
                    per_seed[sc.seed] = load_stored(sc, args.samples_per_digit, args.pairs_per_digit)
                elif stage == "base":
                    per_seed[sc.seed]["base"] = run_base(sc, args.force)
                else:
                    per_seed[sc.seed][stage] = run_finetune(sc, stage, args.force, args.samples_per_digit,
                                                            args.pairs_per_digit, base["stamp"])
                if not args.child:
                    write_outputs(root, seeds, per_seed, meta)
    if args.child:
        return 0
    table = write_outputs(root, seeds, per_seed, meta)
    print(meta["header"])
    print(table)
    print(f"[evidence] {root / 'evidence.json'}, {root / 'evidence.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
