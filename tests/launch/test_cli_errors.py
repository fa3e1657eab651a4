"""Hostile-but-fair input to ``loom``: each case ends with one line naming the file, key or value — exit status 2
for a config error, 1 for the others — and no traceback (issue 16, point 4)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import cli

ROOT = Path(__file__).resolve().parents[2]


def _tiny_config(path: Path, demo: Path, output_dir: Path) -> Path:
    """A one-step pixel-space DiT (patch size 2: heights and widths must be even) on the digits demo shards."""
    cfg = {
        "run": {"name": "tiny", "output_dir": str(output_dir), "seed": 0},
        "data": {"urls": f"{demo}/train-{{000000..000001}}.tar", "resolution": 8, "batch_size": 8,
                 "num_workers": 0, "shuffle_buffer": 16},
        "pipeline": ["diffusion"],
        "diffusion": {
            "denoiser": "dit", "latents": "pixels",
            "model": {"dit": {"sample_size": 8, "patch_size": 2, "in_channels": 3, "hidden_size": 32, "depth": 1,
                              "num_heads": 2, "context_dim": 64, "pooled_dim": 32}},
            "text_encoder": {"model": "openclip-tiny-text", "layer": "last"},
            "process": {"kind": "discrete", "schedule": "cosine", "prediction": "v_prediction"},
            "train": {"max_steps": 1, "cpu": True, "progress": False, "checkpoint_every": 1, "ema_decay": 0.9},
            "validation_prompts": [], "validation_loss_batches": 1,
        },
        "report": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(its config, the run directory) of a finished one-step run."""
    from data_pipeline.demo import build_demo_set

    root = tmp_path_factory.mktemp("tiny-run")
    build_demo_set(root / "demo", progress=False)
    config = _tiny_config(root / "tiny.yaml", root / "demo", root / "runs")
    assert cli.main(["--log-level", "WARNING", "train", "--config", str(config)]) == 0
    return config, root / "runs" / "tiny"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "latin1.yaml").write_bytes("run:\n  name: caf\u00e9\n".encode("latin-1"))
    (d / "folder.yaml").mkdir()
    (d / "folder").mkdir()
    (d / "notes.txt").write_text("some notes, not weights\n" * 8)
    (d / "notes.safetensors").write_text("some notes, not weights\n" * 8)
    (d / "empty.safetensors").write_bytes(b"")
    return d


def _cases(bad: Path, config: Path, run_dir: Path) -> list[tuple[list[str], int, list[str]]]:
    """(argv, exit status, what the line must say)."""
    sample = ["sample", f"run_dir={run_dir}", "num_per_prompt=1", "sampling.steps=2", "device=cpu"]
    return [
        (["train", "--config", str(bad / "latin1.yaml"), "--dry-run"], 2,
         [str(bad / "latin1.yaml"), "not UTF-8", "0xe9"]),
        (["train", "--config", str(bad / "folder"), "--dry-run"], 2, [str(bad / "folder"), "is a directory"]),
        (["train", "--config", str(bad / "folder.yaml"), "--dry-run"], 2,
         [str(bad / "folder.yaml"), "is a directory"]),
        (["train", "--config", str(config), f"data.urls={bad}/nothing-{{000..009}}.tar",
          f"run.output_dir={bad / 'out'}"], 1, [f"{bad}/nothing-{{000..009}}.tar"]),
        (["sample", f"run_dir={bad / 'no-such-run'}"], 1, [str(bad / "no-such-run")]),
        ([*sample, f"weights={bad / 'notes.txt'}"], 1, [f"weights file {bad / 'notes.txt'}", "not a torch weights"]),
        ([*sample, f"weights={bad / 'notes.safetensors'}"], 1,
         [f"weights file {bad / 'notes.safetensors'}", "not a readable safetensors file"]),
        ([*sample, "--lora", str(bad / "notes.safetensors")], 1,
         [f"LoRA adapter {bad / 'notes.safetensors'}", "not a readable safetensors file"]),
        ([*sample, "--lora", str(bad / "empty.safetensors")], 1,
         [f"LoRA adapter {bad / 'empty.safetensors'}", "empty"]),
        ([*sample, "height=5", "width=8"], 2, ["height=5, width=8", "multiples of 2", "patch size 2"]),
    ]


CASE_NAMES = ["yaml-not-utf8", "config-is-a-folder", "config-folder-named-yaml", "train-urls-match-nothing",
              "sample-run-dir-missing", "weights-text-file", "weights-text-named-safetensors", "lora-text-file",
              "lora-empty-file", "height-not-a-patch-multiple"]


@pytest.mark.parametrize("index", range(len(CASE_NAMES)), ids=CASE_NAMES)
def test_bad_input_is_one_clear_line(index, tiny_run, bad_files, capsys):
    config, run_dir = tiny_run
    argv, status, words = _cases(bad_files, config, run_dir)[index]
    capsys.readouterr()
    code = cli.main(["--log-level", "ERROR", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "[WARNING]" not in line]
    assert code == status, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"loom {argv[0]}: "), err[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_bad_input_through_the_console_leaves_no_traceback(tiny_run, bad_files):
    """The same boundary seen from outside: a fresh ``python -m launch`` process, stderr as the user sees it."""
    _, run_dir = tiny_run
    proc = subprocess.run([sys.executable, "-m", "launch", "sample", f"run_dir={run_dir}", "device=cpu",
                           "--lora", str(bad_files / "empty.safetensors")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"loom sample: LoRA adapter {bad_files / 'empty.safetensors'}: the file is empty" in proc.stderr
