"""FSDP2 shards each model block by block under the production launch file ``launch/accelerate/fsdp2.yaml``.

The two-rank run (``fsdp2_wrap_worker.py``, gloo on the CPU) builds Accelerate's FSDP plugin from the launch file
exactly as ``accelerate launch`` does and shards with Accelerate's own ``fsdp2_prepare_model``; the other tests here
check, without processes, the plugin bookkeeping that lets one plugin serve the models of a pipeline in turn.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fsdp2_wrap_worker import LAUNCH_FILE, launch_environment  # noqa: E402
from sharding_launch import base_env, run_ranks  # noqa: E402

from models.autoencoder import AutoencoderKL, tiny_vae_config  # noqa: E402
from models.dit import DiT, DiTConfig  # noqa: E402
from models.unet import UNet, tiny_unet_config  # noqa: E402
from models.utils import block_class_names, repeated_blocks  # noqa: E402
from training.sharding import set_fsdp_block_classes  # noqa: E402

HERE = Path(__file__).resolve().parent
TINY_DIT = DiTConfig(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2)


def production_plugin():
    """Accelerate's FSDP plugin as the workers of ``accelerate launch --config_file fsdp2.yaml`` build it."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    with mock.patch.dict(os.environ, launch_environment(LAUNCH_FILE)):
        return FullyShardedDataParallelPlugin()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_production_fsdp2_launch_file_makes_every_dit_block_its_own_unit(tmp_path):
    report_path = tmp_path / "wrap.json"
    run_ranks(HERE / "fsdp2_wrap_worker.py", [report_path], 2, base_env(device="cpu"), timeout=240,
              log_dir=tmp_path / "logs")
    report = json.loads(report_path.read_text())
    env = report["launch_env"]
    assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # the class list comes from each model, not the file

    dit = report["dit"]
    assert dit["classes"] == ["DiTBlock"]
    assert dit["blocks"] == ["blocks.0", "blocks.1", "blocks.2"]
    assert dit["units"] == ["<root>", "blocks.0", "blocks.1", "blocks.2"]  # every block its own unit, plus the rest
    # the autoencoder, prepared first with the same plugin, got its own blocks; the DiT was not searched for them
    ae = report["autoencoder"]
    assert ae["classes"] == ["ResBlock"] and len(ae["blocks"]) >= 4
    assert ae["units"] == ["<root>", *ae["blocks"]]
    # without named blocks the launch file shards a DiT as one unit: what this test exists to catch
    assert report["unnamed_dit"]["units"] == ["<root>"] and report["unnamed_dit"]["classes"] == []
    # and the block-sharded DiT computes what the unsharded one does, and trains
    assert report["dit_output_vs_unsharded"] < 1e-5
    assert report["dit_grads_finite"]


def test_each_model_names_its_repeated_blocks():
    dit, unet, ae = DiT(TINY_DIT), UNet(tiny_unet_config()), AutoencoderKL(tiny_vae_config())
    assert block_class_names(dit) == ["DiTBlock"]
    assert repeated_blocks(dit) == list(dit.blocks)
    assert block_class_names(unet) == ["ResBlock", "TransformerBlock"]
    kinds = {type(b).__name__ for b in repeated_blocks(unet)}
    assert kinds == {"ResBlock", "TransformerBlock"} and len(repeated_blocks(unet)) > 4
    assert block_class_names(ae) == ["ResBlock"] and len(repeated_blocks(ae)) > 4

    class Extra(DiT):
        _no_split_modules = ("VideoBlock", "DiTBlock")

    # a name the model does not contain is left out (Accelerate would stop on it)
    assert block_class_names(Extra(TINY_DIT)) == ["DiTBlock"]


def test_one_plugin_serves_each_model_of_a_pipeline_in_turn():
    """Accelerate keeps one plugin per process and writes the first model's class list into it; the trainer resets
    it from each model before ``prepare`` so that the DiT after the autoencoder is wrapped by its own blocks."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin = production_plugin()
    assert plugin.transformer_cls_names_to_wrap is None  # the production file names no classes
    ae, dit = AutoencoderKL(tiny_vae_config()), DiT(TINY_DIT)
    for model, expected, block_type in ((ae, ["ResBlock"], "ResBlock"), (dit, ["DiTBlock"], "DiTBlock"),
                                        (ae, ["ResBlock"], "ResBlock")):
        assert set_fsdp_block_classes(plugin, model) == expected
        plugin.set_auto_wrap_policy(model)  # what Accelerator.prepare does first
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        wrapped = [m for m in model.modules() if m is not model and policy(m)]
        assert wrapped and all(type(m).__name__ == block_type for m in wrapped)
        assert wrapped == repeated_blocks(model)

    # a class list given in the launch file is kept as given
    plugin = production_plugin()
    plugin.transformer_cls_names_to_wrap = ["DiTBlock"]
    assert set_fsdp_block_classes(plugin, AutoencoderKL(tiny_vae_config())) == ["DiTBlock"]


def test_without_the_reset_the_second_model_of_a_pipeline_fails():
    """The failure the reset prevents: Accelerate alone searches the DiT for the autoencoder's blocks."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin = production_plugin()
    ae, dit = AutoencoderKL(tiny_vae_config()), DiT(TINY_DIT)
    plugin.set_auto_wrap_policy(ae)
    fsdp2_prepare_auto_wrap_policy(plugin, ae)
    plugin.set_auto_wrap_policy(dit)
    with pytest.raises(ValueError, match="ResBlock"):
        fsdp2_prepare_auto_wrap_policy(plugin, dit)
