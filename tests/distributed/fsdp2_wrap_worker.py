"""Run by ``tests/distributed/test_fsdp2_wrapping.py`` as 2 ranks (gloo, CPU): the PRODUCTION launch file
``launch/accelerate/fsdp2.yaml`` applied to our models, and which modules become FSDP units.

Accelerate turns FSDP on only for GPUs, so no ``Accelerator`` is built. Everything else is Accelerate's own code, as
``accelerate launch --config_file launch/accelerate/fsdp2.yaml`` and ``Accelerator.prepare`` run it: the launch
arguments are parsed and validated from the YAML and turned into the worker environment
(``prepare_multi_gpu_env``), the ``FullyShardedDataParallelPlugin`` is built from that environment, the trainer's
:func:`training.sharding.set_fsdp_block_classes` points it at the model, and Accelerate's ``fsdp2_prepare_model``
(what ``prepare`` calls for FSDP2) shards it. As in a pipeline, one plugin serves two models in turn: the autoencoder,
then the DiT. A DiT subclass naming no blocks shows what the launch file did before (one unit).

Rank 0 writes a JSON report: per model, the FSDP units (module names) and the repeated blocks it names, plus the
sharded DiT's output against an unsharded copy.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from models.conditioning import Conditioning  # noqa: E402
from models.dit import DiT, DiTConfig  # noqa: E402
from models.utils import repeated_blocks  # noqa: E402
from training.sharding import set_fsdp_block_classes  # noqa: E402

LAUNCH_FILE = REPO / "launch" / "accelerate" / "fsdp2.yaml"


def launch_environment(config_file: Path) -> dict[str, str]:
    """The FSDP / Accelerate variables ``accelerate launch --config_file config_file`` gives its workers."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    with mock.patch.dict(os.environ, {"ACCELERATE_CONFIG_FILE": ""}):
        args, _, _ = _validate_launch_command(args)
    if not args.use_fsdp:
        raise RuntimeError(f"{config_file} does not launch FSDP")
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}


class UnnamedDiT(DiT):
    """The DiT as it was before it named its blocks."""

    _no_split_modules = None


def fsdp_units(model: torch.nn.Module) -> list[str]:
    from torch.distributed.fsdp import FSDPModule

    return [name or "<root>" for name, m in model.named_modules() if isinstance(m, FSDPModule)]


def main() -> None:
    report_path = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    env = launch_environment(LAUNCH_FILE)
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    # what fsdp2_prepare_model reads from the Accelerator (Accelerate's FSDP needs a GPU to build a real one)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                  is_main_process=dist.get_rank() == 0, device=torch.device("cpu"))

    torch.manual_seed(0)
    autoencoder = AutoencoderKL(AutoencoderConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                                                  mid_block_attention=False))
    dit_config = DiTConfig(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                           num_classes=10)
    dit = DiT(dit_config)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))  # off the adaLN-Zero init, so the output is not trivially zero
    reference = copy.deepcopy(dit)
    unnamed = UnnamedDiT(dit_config)

    report: dict = {"launch_env": {k: env[k] for k in sorted(env)}}
    for name, model in (("autoencoder", autoencoder), ("dit", dit), ("unnamed_dit", unnamed)):
        blocks = [n for n, m in model.named_modules() if any(m is b for b in repeated_blocks(model))]
        classes = set_fsdp_block_classes(plugin, model)  # what the trainer does before prepare
        fsdp2_prepare_model(accelerator, model)
        report[name] = {"units": fsdp_units(model), "blocks": blocks, "classes": classes}

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t, cond = torch.tensor([10, 700]), Conditioning(class_labels=torch.tensor([1, 7]))
    out = dit(x, t, cond)
    out.square().mean().backward()  # gathers and reduces block by block
    with torch.no_grad():
        expected = reference(x, t, cond)
    report["dit_output_vs_unsharded"] = float((out.detach() - expected).abs().max())
    report["dit_grads_finite"] = all(bool(torch.isfinite(p.grad.full_tensor()).all())
                                     for p in dit.parameters() if p.grad is not None)
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
