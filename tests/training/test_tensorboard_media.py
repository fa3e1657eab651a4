"""Validation pictures and clips reach TensorBoard: grids in the Images tab, clips as animated GIF summaries (what
TensorBoard plays as video), read back from the event files with TensorBoard's own reader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from training.evaluation import animation_frames, grid_image
from training.tensorboard_media import log_media


def _images_in(log_dir: Path) -> dict[str, list]:
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def _moving_squares(b: int = 3, t: int = 4, size: int = 8) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1]: a white 2×2 square stepping right one pixel a frame, one row per clip."""
    clips = -torch.ones(b, 3, t, size, size)
    for i in range(b):
        for k in range(t):
            clips[i, :, k, 2 * i:2 * i + 2, k:k + 2] = 1.0
    return clips


def test_clips_become_an_animated_gif_summary_with_every_frame(tmp_path):
    clips = _moving_squares()
    with SummaryWriter(str(tmp_path)) as writer:
        assert log_media(writer, {"val/clips": (clips, 4.0)}, step=7, scale=1) == ["val/clips"]
    events = _images_in(tmp_path)["val/clips"]
    assert [e.step for e in events] == [7]
    data = events[0].encoded_image_string
    assert data[:6] == b"GIF89a"
    gif = Image.open(io.BytesIO(data))
    assert gif.n_frames == clips.shape[2]
    assert gif.info["duration"] == 250  # 4 frames per second
    expected = animation_frames(clips, nrow=3)
    assert (events[0].width, events[0].height) == expected[0].size
    for k in range(clips.shape[2]):  # every frame of the animation is the grid of that frame (black/white: exact)
        gif.seek(k)
        np.testing.assert_array_equal(np.asarray(gif.convert("RGB")), np.asarray(expected[k].convert("RGB")))


def test_images_become_a_grid_and_bad_shapes_name_the_tag(tmp_path):
    images = torch.rand(4, 3, 6, 6) * 2 - 1
    with SummaryWriter(str(tmp_path)) as writer:
        log_media(writer, {"val/samples": (images, 8.0)}, step=3, scale=2)
        with pytest.raises(ValueError, match="media 'bad'"):
            log_media(writer, {"bad": (torch.zeros(3, 6, 6), 8.0)}, step=3)
    event = _images_in(tmp_path)["val/samples"][0]
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, np.asarray(grid_image(images, scale=2)))
