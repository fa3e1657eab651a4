"""The launch files themselves: the shell scripts parse (bash -n) and pass shellcheck; every Accelerate config
resolves, through Accelerate's own launch-argument code, to the strategy its name promises; the DeepSpeed JSONs
leave to our config exactly what it decides ("auto") and are valid DeepSpeed configs once those are filled."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from harness import REPO

LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
ACCELERATE = LAUNCH / "accelerate"
DEEPSPEED = LAUNCH / "deepspeed"
# what our run config decides; the JSONs must leave these to the trainer
AUTO_KEYS = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
             "gradient_clipping", "bf16.enabled", "fp16.enabled"}


def test_the_expected_scripts_exist():
    names = {p.relative_to(LAUNCH).as_posix() for p in SCRIPTS}
    assert {"torchrun_multinode.sh", "slurm/train.sbatch"} <= names
    # srun and users run the per-node script directly
    assert os.access(LAUNCH / "torchrun_multinode.sh", os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_n(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck): the scripts were not linted")
    proc = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _resolve(config: Path):
    """What ``accelerate launch --config_file config`` would set up: (args, worker environment)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    with mock.patch.dict(os.environ, {"ACCELERATE_CONFIG_FILE": ""}):
        args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


EXPECTED = {  # config: (launcher, zero stage, optimizer offload, parameter offload)
    "ddp.yaml": ("multi_gpu", None, None, None),
    "ddp_cpu_gloo.yaml": ("multi_gpu", None, None, None),
    "zero1.yaml": ("deepspeed", 1, "none", "none"),
    "zero2.yaml": ("deepspeed", 2, "none", "none"),
    "zero3.yaml": ("deepspeed", 3, "none", "none"),
    "zero3_offload.yaml": ("deepspeed", 3, "cpu", "cpu"),
    "fsdp2.yaml": ("fsdp", None, None, None),
}


def test_every_accelerate_config_is_covered():
    assert {p.name for p in ACCELERATE.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_resolves_to_its_strategy(name, monkeypatch):
    launcher, stage, offload_opt, offload_param = EXPECTED[name]
    monkeypatch.chdir(REPO)  # the DeepSpeed JSON paths are relative to the repository root
    args, env = _resolve(ACCELERATE / name)
    assert not args.cpu  # `use_cpu: true` makes accelerate launch start a single process
    if launcher == "multi_gpu":
        assert args.multi_gpu and not args.use_deepspeed and not args.use_fsdp
        assert int(args.num_processes) >= 2
    elif launcher == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        assert args.use_fsdp
        with mock.patch.dict(os.environ, env, clear=True):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
        # block by block, the blocks named by each model (test_fsdp2_wrapping.py runs it on two ranks)
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
        assert plugin.transformer_cls_names_to_wrap is None
    else:
        from accelerate.utils import DeepSpeedPlugin

        assert args.use_deepspeed
        with mock.patch.dict(os.environ, env, clear=True):
            plugin = DeepSpeedPlugin()
            plugin.set_mixed_precision("bf16")  # what the trainer's train.mixed_precision=auto picks on a GPU
        assert (plugin.zero_stage, plugin.offload_optimizer_device, plugin.offload_param_device) == (
            stage, offload_opt, offload_param)
        assert plugin.deepspeed_config["bf16"]["enabled"] is True
        assert plugin.deepspeed_config["fp16"]["enabled"] is False
    if launcher != "deepspeed":
        # Accelerator(mixed_precision=...) from train.mixed_precision overrides this; the file must not force one
        assert env.get("ACCELERATE_MIXED_PRECISION", "no") == "no"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"])
def test_deepspeed_json(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = json.loads((DEEPSPEED / name).read_text())
    flat = _flat(cfg)
    assert {k for k, v in flat.items() if v == "auto"} == AUTO_KEYS
    assert "optimizer" not in cfg and "scheduler" not in cfg  # the trainer's AdamW and LR schedule are used
    stage = int(re.search(r"zero(\d)", name).group(1))
    assert cfg["zero_optimization"]["stage"] == stage
    if "offload" in name:
        assert flat["zero_optimization.offload_optimizer.device"] == "cpu"
        assert flat["zero_optimization.offload_param.device"] == "cpu"
    if stage == 3:  # the consolidated export gathers the full weights on save
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # filled as the trainer fills them (micro-batch 4, 2 accumulation steps, one process), DeepSpeed accepts it
    filled = json.loads(json.dumps(cfg))
    filled.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, train_batch_size=8,
                  gradient_clipping=1.0)
    filled["bf16"]["enabled"], filled["fp16"]["enabled"] = True, False
    ds = DeepSpeedConfig(filled)
    assert (ds.train_batch_size, ds.zero_optimization_stage, ds.bfloat16_config.enabled) == (8, stage, True)


def test_deepspeed_configs_referenced_by_accelerate_exist():
    import yaml

    for path in ACCELERATE.glob("zero*.yaml"):
        ref = yaml.safe_load(path.read_text())["deepspeed_config"]["deepspeed_config_file"]
        assert (REPO / ref).is_file() and Path(ref).stem == path.stem, (path.name, ref)


def test_hostfile_example():
    lines = [ln for ln in (DEEPSPEED / "hostfile.example").read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(lines) >= 2 and all(re.fullmatch(r"[\w.-]+ slots=\d+", ln) for ln in lines), lines
