"""LPIPS: our VGG16 LPIPS equals the reference `lpips` package given the same weights; the autoencoder stage
uses it only with a weights file."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from training.config_io import ConfigError, from_dict
from training.perceptual import LPIPS, lpips_state_from_files
from training.stages.autoencoder import AutoencoderStageConfig

lpips = pytest.importorskip("lpips")


@pytest.fixture(scope="module")
def reference_and_files(tmp_path_factory):
    """The reference LPIPS with its published linear layers and a random VGG trunk (ImageNet VGG weights cannot be
    downloaded here), and the same weights as the two files users have: torchvision VGG16 and lpips' vgg.pth."""
    tmp = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    trunk = {}
    for name, value in ref.net.state_dict().items():  # sliceK.N.weight → features.N.weight (torchvision indices)
        _, index, kind = name.split(".")
        trunk[f"features.{index}.{kind}"] = value
    torch.save(trunk, tmp / "vgg16.pth")
    lin_file = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    converted = tmp / "lpips_vgg.safetensors"
    save_file(lpips_state_from_files(tmp / "vgg16.pth", lin_file), str(converted))
    return ref, converted


def test_matches_the_reference_implementation(reference_and_files):
    ref, path = reference_and_files
    ours = LPIPS.from_file(path)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 48, 48, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 48, 48, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        expected = ref(x, y).flatten()
        got = ours(x, y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(got > 0)
    assert torch.allclose(ours(x, x), torch.zeros(3), atol=1e-7)


def test_perceptual_term_needs_weights(tmp_path, reference_and_files):
    with pytest.raises(ConfigError, match="perceptual_weight: 1.0 needs lpips_weights"):
        from_dict(AutoencoderStageConfig, {"perceptual_weight": 1.0})
    with pytest.raises(FileNotFoundError, match="LPIPS weights"):
        LPIPS.from_file(tmp_path / "absent.safetensors")


def test_autoencoder_stage_adds_the_lpips_term(reference_and_files):
    from data_pipeline.batch import Batch
    from training.stages.autoencoder import AutoencoderStage

    _, path = reference_and_files
    model = {"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4}
    torch.manual_seed(0)
    plain = AutoencoderStage(from_dict(AutoencoderStageConfig, {"model": model}))
    torch.manual_seed(0)
    with_p = AutoencoderStage(from_dict(AutoencoderStageConfig, {"model": model, "perceptual_weight": 1.0,
                                                                  "lpips_weights": str(path)}))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = Batch(pixels=x, captions=["", ""], keys=["a", "b"], metadata=[{}, {}],
                  original_size=torch.zeros(2, 2), crop_top_left=torch.zeros(2, 2), target_size=torch.zeros(2, 2))
    torch.manual_seed(5)
    loss_plain, _ = plain.loss(plain.model, batch)
    torch.manual_seed(5)
    loss_p, logs = with_p.loss(with_p.model, batch)
    assert logs["lpips"] > 0
    torch.testing.assert_close(loss_p - loss_plain, torch.tensor(logs["lpips"] * x[0].numel()), rtol=1e-4, atol=1e-3)
