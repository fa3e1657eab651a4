"""LPIPS, the learned perceptual distance the Latent Diffusion autoencoder trains with (Zhang et al. 2018,
"The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), VGG16 variant.

Both images go through VGG16's convolutional trunk; at the five ``relu*_*`` taps each feature vector is normalised
to unit length over channels, the squared differences are weighted per channel by a learned 1×1 convolution (the
"linear calibration"), averaged over space, and summed over taps: one distance per image pair.

Its weights are two published files that cannot be downloaded here: torchvision's ImageNet VGG16 and the LPIPS
linear layers (``vgg.pth`` of the ``lpips`` package). :func:`lpips_state_from_files` converts them into this
module's names; :meth:`LPIPS.from_file` loads a converted ``.safetensors``. Nothing is ever random at use time:
building the loss without weights is a configuration error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

# torchvision's vgg16().features indices of the ReLUs LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAPS = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# The input scaling LPIPS applies to images in [-1, 1] before VGG (its "ScalingLayer").
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def _vgg16_trunk() -> nn.Sequential:
    """VGG16's feature layers up to relu5_3, in torchvision's layout (so its state-dict names load as they are)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for block, (width, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
        if block:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(convs):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = width
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """``lpips(x, y) -> (B,)`` perceptual distances of images in [-1, 1]; frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_trunk()
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        h = (x - self.shift) / self.scale  # (B, 3, H, W)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h)  # (B, C_k, H_k, W_k)
            if i == TAPS[-1]:
                break
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        total = x.new_zeros(x.shape[0])
        for fx, fy, lin in zip(self._taps(x), self._taps(y), self.lins):
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((nx - ny) ** 2).mean(dim=(1, 2, 3))  # (B,)
        return total

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always frozen

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        """Load converted weights (``features.*`` and ``lins.*``) from a ``.safetensors`` file, strictly."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights {path} do not exist (see training/perceptual.py for the format)")
        model = cls()
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        if missing or unexpected:
            raise ValueError(f"LPIPS weights {path}: missing {missing[:4]}, unexpected {unexpected[:4]}")
        return model


def lpips_state_from_files(vgg16_path: str | Path, lin_path: str | Path) -> dict[str, Tensor]:
    """Our state dict from torchvision's VGG16 weights (``features.N.weight``…) and the ``lpips`` package's linear
    layers (``linK.model.1.weight``), both read with ``weights_only=True``."""
    vgg = torch.load(str(vgg16_path), map_location="cpu", weights_only=True)
    lin = torch.load(str(lin_path), map_location="cpu", weights_only=True)
    state = {k: v for k, v in vgg.items() if k.startswith("features.") and int(k.split(".")[1]) <= TAPS[-1]}
    for k in range(len(TAP_CHANNELS)):
        state[f"lins.{k}.weight"] = lin[f"lin{k}.model.1.weight"]
    return state
