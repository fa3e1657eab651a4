"""Measurements that turn "it learns" into numbers: image grids, PSNR, and a digit classifier that reads samples."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image


def to_uint8(images: Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] → ``(B, H, W, C)`` uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images: Tensor, nrow: Optional[int] = None, scale: int = 1) -> "Image.Image":
    """Images in [-1, 1] as one picture with 2-pixel white gutters (torchvision's ``make_grid``).

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
    return img


def save_grid(images: Tensor, path: str | os.PathLike, nrow: Optional[int] = None, scale: int = 1) -> Path:
    """Save images in [-1, 1] as one PNG grid (:func:`grid_image`: images ``nrow`` to a row, or clips as a contact
    sheet, one clip per row)."""
    img = grid_image(images, nrow, scale)
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


def animation_frames(clips: Tensor, nrow: Optional[int] = None, scale: int = 1) -> list["Image.Image"]:
    """Clips ``(B, C, T, H, W)`` in [-1, 1] as T pictures: picture t is the grid of every clip's frame t, ``nrow``
    clips to a row (default: a square-ish grid)."""
    if clips.ndim != 5:
        raise ValueError(f"animation: expected clips (B, C, T, H, W), got {tuple(clips.shape)}")
    b = clips.shape[0]
    nrow = nrow or math.ceil(math.sqrt(b))
    return [grid_image(clips[:, :, i], nrow, scale) for i in range(clips.shape[2])]


def write_animation(frames: Sequence, out: str | os.PathLike | BinaryIO, fps: float, fmt: Optional[str] = None) -> None:
    """Write pictures as one looping animation to a path (format by the suffix: GIF or WebP) or a binary file
    object (``fmt`` names the format)."""
    fmt = fmt or Path(out).suffix.lstrip(".").upper()
    lossless = {"lossless": True} if fmt.upper() == "WEBP" else {}
    frames[0].save(out, format=fmt, save_all=True, append_images=list(frames[1:]), duration=round(1000 / fps),
                   loop=0, **lossless)


def save_clip_grid_animation(clips: Tensor, path: str | os.PathLike, fps: float = 8.0, nrow: Optional[int] = None,
                             scale: int = 1) -> Path:
    """Save clips ``(B, C, T, H, W)`` in [-1, 1] as one animated grid (GIF, or WebP by the suffix): frame t of the
    animation is the grid of every clip's frame t, ``nrow`` clips to a row, looping."""
    frames = animation_frames(clips, nrow, scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_animation(frames, path, fps)
    return path


def psnr(reconstruction: Tensor, target: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), averaged over the batch."""
    mse = ((reconstruction.float().clamp(-1, 1) - target.float()) ** 2).flatten(1).mean(1)  # (B,)
    return float((10 * torch.log10(4.0 / mse.clamp_min(1e-12))).mean())


def temporal_flicker(reconstruction: Tensor, target: Tensor) -> float:
    """Flicker of reconstructed clips ``(B, C, T, H, W)`` in [-1, 1] (T >= 2): the mean absolute difference between
    their frame-to-frame changes and the originals' (``|(r[t+1] - r[t]) - (x[t+1] - x[t])|`` averaged over every
    pixel, channel and frame pair), in the [-1, 1] pixel scale. 0 when the reconstruction changes from frame to frame
    exactly as the clip does; errors that differ from frame to frame (a per-frame autoencoder's) raise it, a
    constant error does not."""
    if reconstruction.ndim != 5 or reconstruction.shape != target.shape or reconstruction.shape[2] < 2:
        raise ValueError(f"temporal_flicker: expected two batches of clips (B, C, T, H, W) of one shape with T >= 2, "
                         f"got {tuple(reconstruction.shape)} and {tuple(target.shape)}")
    r, x = reconstruction.float().clamp(-1, 1), target.float()
    return float(((r[:, :, 1:] - r[:, :, :-1]) - (x[:, :, 1:] - x[:, :, :-1])).abs().mean())


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
