"""The `loom` command line: every command registered, presets resolve, bad configs stop before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch import cli
from launch.commands import COMMAND_HELP, load_command, load_commands

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "accelerate", "deepspeed", "open_clip", "training.trainer", "training.run_config")


def test_every_command_is_registered():
    assert set(load_commands()) >= {"shards", "data", "train", "sample"}


@pytest.mark.parametrize("name", list(COMMAND_HELP))
def test_registry_line_is_the_commands_own_help(name):
    cmd = load_command(name)
    assert cmd.name == name and cmd.help == COMMAND_HELP[name]


def _imported_by(*argv: str) -> set[str]:
    """Modules a fresh ``python -m launch ARGV`` imports (read from ``-X importtime``)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "launch", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("argv", [("--help",), ("shards", "--help"),
                                  ("shards", "demo", "output_dir=/nonexistent/loom-test", "--dry-run")])
def test_shards_starts_without_the_training_stack(argv):
    mods = _imported_by(*argv)
    assert "launch.cli" in mods  # the import log was read
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))
    assert not {"launch.commands.data", "launch.commands.train", "launch.commands.sample"} & mods


def test_quickstart_preset_resolves_with_plan(capsys):
    assert cli.main(["train", "--config", "quickstart", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "# plan" in out
    assert "stages: autoencoder -> cache -> diffusion" in out
    assert "report: runs/quickstart/report.md with the digit-classifier learning check" in out


def test_finetuning_presets_plan_their_stages(capsys):
    assert cli.main(["train", "--config", "lora-mirrored", "lora.adapter.rank=4", "--dry-run"]) == 0
    out = capsys.readouterr().out.split("# plan")[1]
    assert "lora: LoRA rank 4, alpha 16.0, on attention+feedforward+projection" in out and "dpo" not in out
    assert cli.main(["train", "--config", "dpo-thick", "dpo.policy=full", "dpo.beta=2500", "--dry-run"]) == 0
    out = capsys.readouterr().out.split("# plan")[1]
    assert "dpo: every denoiser weight (reference: a frozen copy of the base)" in out
    assert "objective dpo, beta 2500.0" in out


@pytest.mark.parametrize(
    "override, message",
    [
        ("diffusion.train.max_stesp=3", "diffusion.train.max_stesp: unknown key; did you mean 'max_steps'?"),
        ("diffusion.process.prediction=velocity", "diffusion.process.prediction: got 'velocity'"),
        ("data.batch_size=big", "data.batch_size: got 'big' (str); expected int"),
        ("pipeline=[diffusion, autoencoder]", "pipeline: ['diffusion', 'autoencoder'] is out of order"),
        ("diffusion.cond_dropout=1.5", "diffusion.cond_dropout: 1.5 must be in [0, 1]"),
        ("diffusion.sampling.sampler=euler", "sampler: 'euler' is for the flow process"),
    ],
)
def test_bad_config_is_reported_with_key_and_exit_code_2(override, message, capsys, tmp_path):
    code = cli.main(["train", "--config", "quickstart", override, f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert not any(tmp_path.iterdir())  # nothing was written: the config was refused before any work


def test_unknown_preset_names_the_presets(capsys):
    assert cli.main(["train", "--config", "quickstrat", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'quickstart'?" in err


def test_positional_override_and_layered_configs(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("run:\n  name: layered\ndiffusion:\n  train:\n    max_steps: 7\n")
    assert cli.main(["train", "-c", "quickstart", "-c", str(extra), "diffusion.train.optim.lr=0.5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "name: layered" in out and "max_steps: 7" in out and "lr: 0.5" in out


def test_resume_flag_sets_every_stage(capsys):
    assert cli.main(["train", "--config", "quickstart", "--resume", "latest", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("resume: latest") == 4  # autoencoder, diffusion, lora and dpo train sections


def test_flags_and_overrides_mix_in_any_order(capsys):
    """`loom sample --lora A x=1 --lora B y=2`: both adapters and both overrides arrive; an unknown flag stops."""
    assert cli.main(["sample", "run_dir=runs/x", "--lora", "a.safetensors:0.8", "num_per_prompt=3", "--lora",
                     "b.safetensors", "--dry-run", "sampling.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "LoRA adapter: a.safetensors x 0.8" in out and "LoRA adapter: b.safetensors x 1" in out
    assert "num_per_prompt: 3" in out and "steps: 7" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["sample", "run_dir=runs/x", "--lorra", "a.safetensors"])
    assert exc.value.code == 2 and "unrecognized arguments: --lorra" in capsys.readouterr().err
