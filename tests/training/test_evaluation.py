"""The one image-grid writer: layout of image grids and of clip contact sheets."""

import numpy as np
import torch
from PIL import Image

from training.evaluation import save_grid, to_uint8


def _cell(grid: np.ndarray, row: int, col: int, h: int, w: int) -> np.ndarray:
    top, left = 2 + row * (h + 2), 2 + col * (w + 2)
    return grid[top:top + h, left:left + w]


def test_image_grid_places_each_image_in_reading_order(tmp_path):
    images = torch.rand(5, 3, 4, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = np.asarray(Image.open(save_grid(images, tmp_path / "g.png", nrow=3)))
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    expected = to_uint8(images)
    for i in range(5):
        np.testing.assert_array_equal(_cell(grid, i // 3, i % 3, 4, 6), expected[i])
    assert (grid[:2] == 255).all() and (_cell(grid, 1, 2, 4, 6) == 255).all()  # white gutters and empty cell


def test_clips_become_a_contact_sheet_one_clip_per_row(tmp_path):
    clips = torch.rand(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, C, T, H, W)
    grid = np.asarray(Image.open(save_grid(clips, tmp_path / "c.png")))
    assert grid.shape == (2 * (5 + 2) + 2, 4 * (6 + 2) + 2, 3)
    for b in range(2):
        for t in range(4):
            np.testing.assert_array_equal(_cell(grid, b, t, 5, 6), to_uint8(clips[b:b + 1, :, t])[0])


def test_scale_repeats_pixels(tmp_path):
    images = torch.linspace(-1, 1, 2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    small = np.asarray(Image.open(save_grid(images, tmp_path / "s.png", nrow=2)))
    big = np.asarray(Image.open(save_grid(images, tmp_path / "b.png", nrow=2, scale=3)))
    np.testing.assert_array_equal(big[::3, ::3], small)


def test_clip_mp4_decodes_to_the_clip(tmp_path):
    """A clip saved as mp4 plays back with its frame count, size and (nearly) its pixels."""
    import av

    from training.evaluation import save_clip_mp4

    t = torch.linspace(-0.8, 0.8, 5)
    clip = t.view(1, 5, 1, 1).expand(3, 5, 16, 16).clone()  # (C, T, H, W): brightness rises frame by frame
    path = save_clip_mp4(clip, tmp_path / "c.mp4", fps=4)
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 16, 3)
    expected = to_uint8(clip.permute(1, 0, 2, 3))
    for got, want in zip(frames, expected):
        assert abs(float(got.mean()) - float(want.mean())) < 3.0


def test_clip_grid_animation_has_one_frame_per_clip_frame(tmp_path):
    from training.evaluation import save_clip_grid_animation

    clips = torch.rand(3, 3, 4, 6, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    path = save_clip_grid_animation(clips, tmp_path / "a.gif", fps=5, nrow=2)
    with Image.open(path) as im:
        assert im.n_frames == 4 and im.size == (2 * (8 + 2) + 2, 2 * (6 + 2) + 2)
        im.seek(2)
        frame = np.asarray(im.convert("RGB"))
    # the GIF palette quantises colours: frame 2's first cell is near clip 0's frame 2
    assert np.abs(_cell(frame, 0, 0, 6, 8).astype(int) - to_uint8(clips[:1, :, 2])[0].astype(int)).mean() < 20
