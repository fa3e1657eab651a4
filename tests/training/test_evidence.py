"""``benchmarks/evidence.py`` without training anything: the per-seed aggregation (mean, minimum, seeds that lack a
stage), the RESULTS table, the reuse stamps, and the overrides that point each fine-tune at its seed's base."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ev = _load("evidence")


def _stage_results(rng: np.random.Generator) -> dict:
    """Random results in the layout the three stages store."""
    u = lambda: float(rng.uniform())  # noqa: E731
    return {
        "base": {"autoencoder_psnr_db": 30 + 10 * u(), "digit_accuracy_guidance_3": u(),
                 "digit_accuracy_guidance_0": u(), "seconds": 300 * u()},
        "lora": {"lora/mirrored prompt": {"mirrored_and_right": u(), "mirrored": u(), "right_digit": u()},
                 "lora/plain prompt": {"right_digit": u(), "mirrored": u()},
                 "base/mirrored prompt": {"mirrored_and_right": u()}, "train_seconds": 100 * u(),
                 "train_cpu_seconds": 100 * u()},
        "dpo": {"held-out prompts": {"dpo": {"win_rate": u()}, "sft": {"win_rate": u()},
                                     "dpo_accuracy_change": u() - 0.5}},
    }


def test_aggregate_mean_min_over_the_seeds_that_have_the_stage():
    rng = np.random.default_rng(3)
    per_seed = {s: _stage_results(rng) for s in (0, 1, 2, 5)}
    del per_seed[1]["lora"]  # seed 1's LoRA has not run yet
    summary = ev.aggregate(per_seed)
    assert set(summary) == {m.key for m in ev.METRICS}
    for m in ev.METRICS:
        have = [s for s in sorted(per_seed) if m.stage in per_seed[s]]
        want = np.array([ev.lookup(per_seed[s][m.stage], m.path) for s in have])
        entry = summary[m.key]
        assert list(entry["values"]) == have and entry["seeds"] == len(have)
        assert entry["mean"] == pytest.approx(want.mean())
        assert entry["min"] == pytest.approx(want.min()) and entry["max"] == pytest.approx(want.max())
    assert 1 not in summary["lora_mirrored_and_right"]["values"] and 1 in summary["psnr_db"]["values"]


def test_aggregate_leaves_out_a_metric_no_seed_has():
    rng = np.random.default_rng(0)
    per_seed = {0: _stage_results(rng), 1: _stage_results(rng)}
    for results in per_seed.values():
        del results["dpo"]
    summary = ev.aggregate(per_seed)
    assert not {"dpo_win_rate", "sft_win_rate", "dpo_accuracy_change"} & set(summary)
    assert "lora_mirrored_and_right" in summary


def test_table_has_a_row_per_metric_a_column_per_seed_and_dashes_for_missing_seeds():
    rng = np.random.default_rng(1)
    per_seed = {0: _stage_results(rng), 1: _stage_results(rng), 2: {}}
    summary = ev.aggregate(per_seed)
    lines = ev.markdown_table(summary, [0, 1, 2]).strip().splitlines()
    assert len(lines) == 2 + len(summary)
    assert lines[0].split("|")[2:-1] == [" seed 0 ", " seed 1 ", " seed 2 ", " mean ", " min ", " max ", " seeds "]
    row = next(line for line in lines if line.startswith("| LoRA: mirrored and right digit"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    entry = summary["lora_mirrored_and_right"]
    assert cells[1] == f"{100 * entry['values'][0]:.1f}%" and cells[3] == "—"
    assert cells[4] == f"**{100 * entry['mean']:.1f}%**" and cells[5] == f"{100 * entry['min']:.1f}%"
    assert cells[6] == f"{100 * entry['max']:.1f}%" and cells[7] == "2"
    assert ev.fmt(-0.025, "pp") == "-2.5 pts" and ev.fmt(39.271, "dB") == "39.27 dB"


def test_stored_result_is_reused_only_with_the_same_stamp(tmp_path):
    a = ev.stamp_of("lora", "config text", (40,), "basestamp", 1)
    assert a == ev.stamp_of("lora", "config text", (40,), "basestamp", 1)
    assert a != ev.stamp_of("lora", "config text", (40,), "basestamp", 2)  # the thread count changes results
    assert a != ev.stamp_of("lora", "config text!", (40,), "basestamp", 1)
    path = tmp_path / "lora.json"
    assert ev.stored(path, a) is None
    path.write_text(json.dumps({"stamp": a, "x": 1}))
    assert ev.stored(path, a)["x"] == 1
    assert ev.stored(path, "other") is None


def test_seed_chain_points_every_stage_at_its_own_seed(tmp_path):
    from training.config_io import load_config
    from training.run_config import RunConfig

    sc = ev.SeedChain(tmp_path, 2, 1)
    base = load_config(RunConfig, ["quickstart"], sc.base_overrides())
    assert (base.run.seed, base.data.seed) == (2, 2)
    assert base.run.directory == sc.base_run and str(sc.demo_dir) in base.data.urls
    assert sc.base_stamp() != ev.SeedChain(tmp_path, 3, 1).base_stamp()
    assert sc.base_stamp() != ev.SeedChain(tmp_path, 2, 2).base_stamp()

    chain = sc.finetune_chain()
    lora = load_config(RunConfig, ["lora-mirrored"], chain.lora_config_overrides())
    assert lora.run.directory == sc.dir / "lora-mirrored" and lora.run.seed == 2
    assert lora.diffusion.weights == str(sc.base_run / "diffusion/export/model.safetensors")
    assert lora.diffusion.text_encoder.checkpoint == str(sc.base_run / "text_encoder.safetensors")
    assert [s.urls for s in lora.data.sources] == [f"{sc.dir}/data/mirrored/train-*.tar",
                                                   f"{sc.demo_dir}/train-{{000000..000001}}.tar"]
    dpo = load_config(RunConfig, ["dpo-thick-sft"], chain.dpo_config_overrides())
    assert dpo.run.directory == sc.dir / "dpo-thick-sft" and dpo.dpo.objective == "sft"
    assert dpo.dpo.data.urls == f"{sc.dir}/data/prefs-thick/train-*.tar"
    assert chain.sample_seed(100) != ev.SeedChain(tmp_path, 0, 1).finetune_chain().sample_seed(100)


def test_bad_stages_are_refused():
    errors = []
    ev.parse_stages("base,lora", errors.append)
    assert not errors
    ev.parse_stages("base,loar", errors.append)
    assert errors and "loar" in errors[0]
