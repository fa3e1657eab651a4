"""Validation pictures and clips into TensorBoard, beside the scalars.

A stage's :meth:`~training.stages.base.Stage.validate` leaves what it drew in ``stage.media`` (tag → images
``(B, C, H, W)`` or clips ``(B, C, T, H, W)`` in [-1, 1]); the trainer hands them to :func:`log_media` with the
TensorBoard writer of its Accelerate tracker, at the validation step.

* Images become one grid (``add_image``; TensorBoard's Images tab, a slider over steps).
* Clips become one animated grid — frame *t* of the animation is every clip's frame *t* — stored as an animated
  GIF in an image summary. That is what TensorBoard plays as a video (``SummaryWriter.add_video`` writes the same
  summary, but encodes the GIF through moviepy, which is not a dependency here; PIL writes it instead).
"""

from __future__ import annotations

import io
from typing import Any, Mapping

from torch import Tensor

from training.evaluation import animation_frames, grid_image, write_animation

#: A clip grid wider than this many clips wraps to the next row.
CLIPS_PER_ROW = 8


def clip_summary(tag: str, clips: Tensor, fps: float, scale: int = 1) -> Any:
    """A TensorBoard ``Summary`` holding ``clips`` ``(B, C, T, H, W)`` in [-1, 1] as one looping animated GIF."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    frames = animation_frames(clips, nrow=min(CLIPS_PER_ROW, clips.shape[0]), scale=scale)
    buffer = io.BytesIO()
    write_animation(frames, buffer, fps, fmt="GIF")
    width, height = frames[0].size
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def log_media(writer: Any, media: Mapping[str, tuple[Tensor, float]], step: int, scale: int = 2) -> list[str]:
    """Write every entry of ``media`` (tag → ``(pictures, fps)``) to the TensorBoard ``writer`` (a
    ``torch.utils.tensorboard.SummaryWriter``) at ``step``: images ``(B, C, H, W)`` as a grid, clips
    ``(B, C, T, H, W)`` as an animated grid at ``fps``. Returns the tags written."""
    written = []
    for tag, (value, fps) in media.items():
        if value.ndim == 5:  # (B, C, T, H, W)
            writer.file_writer.add_summary(clip_summary(tag, value, fps, scale), step)
        elif value.ndim == 4:  # (B, C, H, W)
            grid = grid_image(value, scale=scale)  # PIL RGB
            writer.add_image(tag, to_uint8_hwc(grid), step, dataformats="HWC")
        else:
            raise ValueError(f"media {tag!r}: expected images (B, C, H, W) or clips (B, C, T, H, W), "
                             f"got shape {tuple(value.shape)}")
        written.append(tag)
    writer.flush()
    return written


def to_uint8_hwc(picture: Any) -> Any:
    """A PIL picture as an ``(H, W, 3)`` uint8 array."""
    import numpy as np

    return np.asarray(picture.convert("RGB"))


__all__ = ["CLIPS_PER_ROW", "clip_summary", "log_media", "to_uint8_hwc"]
