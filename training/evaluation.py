"""Measurements that turn "it learns" into numbers: image grids, PSNR, and a digit classifier that reads samples."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] → ``(B, H, W, C)`` uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: Tensor, path: str | os.PathLike, nrow: Optional[int] = None, scale: int = 1) -> Path:
    """Save images in [-1, 1] as one PNG grid with 2-pixel white gutters (torchvision's ``make_grid``).

    ``(B, C, H, W)`` images go ``nrow`` to a row (default: a square-ish grid); ``(B, C, T, H, W)`` clips become a
    contact sheet, one clip per row with its frames left to right (``nrow`` is then the frame count). ``scale``
    enlarges the picture by pixel repetition, for tiny images.
    """
    from PIL import Image
    from torchvision.utils import make_grid

    if images.ndim == 5:  # (B, C, T, H, W) -> (B*T, C, H, W), frame index fastest
        b, c, t, h, w = images.shape
        images, nrow = images.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), t
    elif images.ndim != 4:
        raise ValueError(f"save_grid: expected (B, C, H, W) images or (B, C, T, H, W) clips, got {tuple(images.shape)}")
    pixels = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)  # (B, C, H, W) uint8
    nrow = nrow or math.ceil(math.sqrt(len(pixels)))
    grid = make_grid(pixels, nrow=nrow, padding=2, pad_value=255)  # (3, H', W') uint8
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_clip_mp4(clip: Tensor, path: str | os.PathLike, fps: float = 8.0, crf: int = 10) -> Path:
    """Save one clip ``(C, T, H, W)`` in [-1, 1] as an H.264 mp4 (libx264, yuv420p: any player reads it; odd sides
    are resampled to the next even size), through the shard writer's encoder."""
    from data_pipeline.writer import H264Encoder, video_output_size

    if clip.ndim != 4:
        raise ValueError(f"save_clip_mp4: expected one clip (C, T, H, W), got {tuple(clip.shape)}")
    frames = to_uint8(clip.permute(1, 0, 2, 3))  # (T, H, W, C)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    encoder = H264Encoder(*video_output_size(frames.shape[2], frames.shape[1], None), fps, crf)
    for frame in frames:
        encoder.add(frame)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoder.finish())
    return path


def save_clip_grid_animation(clips: Tensor, path: str | os.PathLike, fps: float = 8.0, nrow: Optional[int] = None,
                             scale: int = 1) -> Path:
    """Save clips ``(B, C, T, H, W)`` in [-1, 1] as one animated grid (GIF, or WebP by the suffix): frame t of the
    animation is the grid of every clip's frame t, ``nrow`` clips to a row, looping."""
    from PIL import Image
    from torchvision.utils import make_grid

    if clips.ndim != 5:
        raise ValueError(f"save_clip_grid_animation: expected clips (B, C, T, H, W), got {tuple(clips.shape)}")
    b, _, t, _, _ = clips.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    frames = []
    for i in range(t):
        pixels = torch.from_numpy(to_uint8(clips[:, :, i])).permute(0, 3, 1, 2)  # (B, C, H, W) uint8
        grid = make_grid(pixels, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
        img = Image.fromarray(grid)
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        frames.append(img)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0,
                   **({"lossless": True} if path.suffix.lower() == ".webp" else {}))
    return path


def psnr(reconstruction: Tensor, target: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), averaged over the batch."""
    mse = ((reconstruction.float().clamp(-1, 1) - target.float()) ** 2).flatten(1).mean(1)  # (B,)
    return float((10 * torch.log10(4.0 / mse.clamp_min(1e-12))).mean())


class DigitClassifier:
    """Reads handwritten digits: an RBF support-vector classifier on 8×8 average-pooled grayscale.

    Fit on the demo set's training split (the 32×32 images, pooled back to 8×8), it reads generated 32×32
    samples the same way, so "the model draws the digit it was asked for" becomes an accuracy.
    """

    def __init__(self) -> None:
        from sklearn.svm import SVC

        self.model = SVC(C=10.0, gamma="scale")

    @staticmethod
    def features(images: Tensor | np.ndarray) -> np.ndarray:
        """``(B, C, 32, 32)`` float in [-1, 1] (tensor) or ``(B, 32, 32, C)`` uint8 (array) → ``(B, 64)``."""
        if isinstance(images, np.ndarray):
            x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1  # (B, C, H, W)
        else:
            x = images.detach().float().cpu()
        gray = x.clamp(-1, 1).mean(1, keepdim=True)  # (B, 1, H, W)
        pooled = F.adaptive_avg_pool2d(gray, 8)  # (B, 1, 8, 8)
        return pooled.flatten(1).numpy()

    def fit(self, images: Tensor | np.ndarray, labels: np.ndarray) -> "DigitClassifier":
        self.model.fit(self.features(images), np.asarray(labels))
        return self

    def predict(self, images: Tensor | np.ndarray) -> np.ndarray:
        return self.model.predict(self.features(images))

    def accuracy(self, images: Tensor | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())

    @classmethod
    def for_demo(cls, seed: int = 0, val_fraction: float = 0.1) -> tuple["DigitClassifier", float]:
        """Fit on the demo training split; return it with its accuracy on the validation split."""
        from data_pipeline.demo import load_digits_split

        xtr, ytr, xva, yva = load_digits_split(seed, val_fraction)
        clf = cls().fit(xtr, ytr)
        return clf, clf.accuracy(xva, yva)
