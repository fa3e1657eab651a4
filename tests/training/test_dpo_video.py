"""Diffusion-DPO on clip pairs: preference shards with ``mp4_0`` / ``mp4_1`` members (moving digits: the captioned
motion preferred to the opposite one), read through the video decoder, cached as clip pairs by the DPO cache and
trained by the same ``dpo`` stage with a factorised video DiT and a temporal-only LoRA, where the implicit reward
accuracy on held-out pairs rises from chance; pairs whose clips do not match are skipped and counted by reason."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from data_pipeline.data_config import DataConfig, VideoConfig
from data_pipeline.moving_digits import STEPS, clip_frames
from data_pipeline.preference import (
    MISMATCH,
    PreferenceSample,
    iter_preference_pairs,
    moving_digit_pair_samples,
    write_preference_shards,
)
from data_pipeline.sources import SkipLog, VideoFrames
from data_pipeline.writer import ShardWriter, WriterOptions, encode_video
from models.dit import DiT
from models.registry import get_preset
from models.text_encoder import TextEncoder, TextEncoderConfig
from training.config_io import load_config
from training.run_config import RunConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TE = TextEncoderConfig(model="openclip-tiny-text", layer="last")


def centroid_track(clip: np.ndarray) -> np.ndarray:
    """(T, 2) ink centroid (x, y) of each frame of a (T, H, W, 3) clip."""
    ink = clip.astype(np.float64).mean(-1)  # (T, H, W)
    ys, xs = np.mgrid[:ink.shape[1], :ink.shape[2]]
    total = ink.sum((1, 2))
    return np.stack([(ink * xs).sum((1, 2)) / total, (ink * ys).sum((1, 2)) / total], 1)


def motion(clip: np.ndarray) -> np.ndarray:
    """Mean (dx, dy) per frame of the ink centroid, fitted over the frames."""
    track = centroid_track(clip)
    t = np.arange(len(track))
    return np.array([np.polyfit(t, track[:, k], 1)[0] for k in range(2)])


def test_moving_digit_pairs_prefer_the_captioned_motion(tmp_path):
    """Written and read back through the video decoder: the winner moves as its caption says, the loser the
    opposite way, both clips hold the same digit; the winner sits on either side (label_0 0 or 1)."""
    chosen = moving_digit_pair_samples("val", limit=12)
    summary = write_preference_shards(chosen, tmp_path, "p", WriterOptions(video_crf=10))
    assert summary.samples == 12 and summary.summary.skips.total == 0
    cfg = DataConfig(urls=str(tmp_path / "p-*.tar"), resolution=32, video=VideoConfig(num_frames=9))
    pairs = list(iter_preference_pairs(cfg, "drop"))
    assert len(pairs) == 12 and {p.label_0 for p in pairs} == {0.0, 1.0}
    for pair, sample in zip(pairs, chosen):
        winner, loser = pair.ordered()
        assert winner.shape == loser.shape == (9, 32, 32, 3)
        direction = sample.extra["direction"]
        assert pair.caption.endswith(f"moving {direction}")
        step = np.array(STEPS[direction], dtype=float)
        # the centroid moves less than the digit (ink leaves the frame at the edges), but clearly each way
        assert motion(winner) @ step > 0.15 and motion(loser) @ step < -0.15, (direction, motion(winner))
        # the same frames in reverse order (up to the codec)
        assert np.abs(winner.astype(int) - loser[::-1].astype(int)).mean() < 2.0
        assert pair.meta["num_frames_0"] == pair.meta["num_frames_1"] == 9
        assert {pair.meta["format_0"], pair.meta["format_1"]} == {"mp4"}


def _clip(frames: np.ndarray) -> bytes:
    """(T, H, W, 3) uint8 → H.264 mp4 bytes."""
    return encode_video(VideoFrames(np.ascontiguousarray(frames), 8.0))[0][0].data


def test_mismatched_clip_pairs_are_skipped_and_counted(tmp_path):
    """Writer and reader both refuse a pair of an image and a clip, or of clips of different frame counts or
    sizes (``mismatched_clips``); the reader counts the video decoder's own refusals too; the DPO cache keeps the
    good pairs and records every skip in its shard index."""
    from training.stages.dpo import cache_preference_pairs

    digit = clip_frames(np.full((32, 32, 3), 0, np.uint8) + np.eye(32, dtype=np.uint8)[..., None] * 200, "left")
    wider = np.pad(digit, ((0, 0), (0, 8), (0, 8), (0, 0)))  # (9, 40, 40, 3)
    nine, five = VideoFrames(digit, 8.0), VideoFrames(digit[:5], 8.0)
    image = digit[4]
    bad = [PreferenceSample(nine, five, "frames differ", 1.0, source_id="frames"),
           PreferenceSample(nine, image, "image and clip", 1.0, source_id="mixed"),
           PreferenceSample(nine, VideoFrames(wider, 8.0), "sizes differ", 0.0, source_id="sizes"),
           PreferenceSample(nine, VideoFrames(digit[::-1].copy(), 8.0), "a good pair", 1.0, source_id="good")]
    summary = write_preference_shards(bad, tmp_path / "written", "p")
    assert summary.samples == 1 and summary.summary.skips.counts == {MISMATCH: 3}

    # shards written elsewhere: hand-made members, each pair with one fault
    members = {
        "good": {"mp4_0": _clip(digit), "mp4_1": _clip(digit[::-1])},
        "frames": {"mp4_0": _clip(digit), "mp4_1": _clip(digit[:7])},
        "sizes": {"mp4_0": _clip(digit), "mp4_1": _clip(wider)},
        "mixed": {"mp4_0": _clip(digit), "png_1": _png(image)},
        "short": {"mp4_0": _clip(digit[:3]), "mp4_1": _clip(digit[3:6])},
        "corrupt": {"mp4_0": b"\x00not a video" * 8, "mp4_1": _clip(digit)},
    }
    with ShardWriter(tmp_path / "raw", "p", WriterOptions()) as writer:
        for name, m in members.items():
            writer.write_members({**m, "txt": name.encode()}, {"label_0": 1.0})
    cfg = DataConfig(urls=str(tmp_path / "raw" / "p-*.tar"), resolution=16, video=VideoConfig(num_frames=4))
    skips = SkipLog()
    pairs = list(iter_preference_pairs(cfg, "drop", skips))
    assert [p.caption for p in pairs] == ["good"] and pairs[0].image_0.shape == (4, 16, 16, 3)
    assert skips.counts == {MISMATCH: 3, "short_clip": 1, "corrupt_video": 1}

    n, cache_skips = cache_preference_pairs(cfg, "train", tmp_path / "cache", None, TextEncoder(TE), "drop",
                                            torch.device("cpu"))
    assert n == 1 and cache_skips.counts == skips.counts
    index = json.loads((tmp_path / "cache" / "train.shardindex.json").read_text())
    assert index["skipped"] == skips.counts


def test_clip_pairs_from_a_table(tmp_path):
    """``loom shards pairs`` on a table with mp4_0 / mp4_1 file columns (CSV and JSONL): clips kept as-is, a
    pair of clips of different lengths or a missing file skipped and counted, the rest read back as clip pairs."""
    from data_pipeline.preference import PairTableSource

    digit = clip_frames(np.eye(32, dtype=np.uint8)[..., None].repeat(3, -1) * 200, "down")
    for name, frames in (("a.mp4", digit), ("b.mp4", digit[::-1]), ("short.mp4", digit[:6])):
        (tmp_path / name).write_bytes(_clip(frames))
    rows = [("a.mp4", "b.mp4", 1.0), ("a.mp4", "short.mp4", 0.0), ("a.mp4", "gone.mp4", 1.0)]
    (tmp_path / "pairs.csv").write_text("caption,mp4_0,mp4_1,label_0\n" +
                                        "".join(f"a line,{a},{b},{lab}\n" for a, b, lab in rows))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"caption": "a line", "mp4_0": a, "mp4_1": b,
                                                              "label_0": lab}) + "\n" for a, b, lab in rows))
    for table in ("pairs.csv", "pairs.jsonl"):
        source = PairTableSource(tmp_path / table)
        out = tmp_path / table.replace(".", "_")
        summary = write_preference_shards(source, out, "p")
        assert summary.samples == 1, table
        assert summary.summary.skips.counts == {MISMATCH: 1, "missing_image": 1}, table
        pairs = list(iter_preference_pairs(DataConfig(urls=str(out / "p-*.tar"), resolution=32,
                                                      video=VideoConfig(num_frames=9))))
        assert len(pairs) == 1 and pairs[0].image_0.shape == (9, 32, 32, 3)
        assert motion(pairs[0].image_0)[1] > 0.15 and motion(pairs[0].image_1)[1] < -0.15  # a down, b up
        assert pairs[0].meta["num_frames_0"] == 9 and pairs[0].meta["format_1"] == "mp4"


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def motion_pairs(tmp_path_factory) -> Path:
    """Clip pairs whose caption says "moving left" or "moving up": the rule to learn (leftward over rightward,
    upward over downward) is purely temporal, as winner and loser hold the same frames in opposite orders."""
    out = tmp_path_factory.mktemp("clip_pairs")
    for split, n in (("train", 96), ("val", 32)):
        chosen = moving_digit_pair_samples(split, directions=("left", "up"), limit=n)
        assert len(chosen) == n and {s.extra["direction"] for s in chosen} == {"left", "up"}
        write_preference_shards(chosen, out, split, WriterOptions(video_crf=10))
    return out


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory) -> str:
    """A pixel-space factorised video DiT (latte-tiny on RGB) with random non-degenerate weights."""
    g = torch.Generator().manual_seed(0)
    model = DiT(get_preset("latte-tiny", in_channels=3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("base") / "latte.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _run_cfg(tmp: Path, pairs: Path, weights: str, *overrides: str) -> RunConfig:
    clips = []
    for data in ("data", "val_data"):  # 3 frames spanning the clip's 9 (a 1-pixel step at 8x8)
        clips += [f"dpo.{data}.resolution=8", f"dpo.{data}.video.num_frames=3", f"dpo.{data}.video.frame_stride=4"]
    return load_config(RunConfig, [], [
        "pipeline=[dpo]", "diffusion.denoiser=latte-tiny", "diffusion.latents=pixels",
        "diffusion.model.latte-tiny.in_channels=3", "diffusion.text_encoder.model=openclip-tiny-text",
        "diffusion.text_encoder.layer=last", "diffusion.process.schedule=cosine",
        "diffusion.process.prediction=v_prediction", f"diffusion.weights={weights}", "diffusion.validation_prompts=[]",
        f"dpo.data.urls={pairs}/train-*.tar", f"dpo.val_data.urls={pairs}/val-*.tar", *clips,
        "dpo.data.batch_size=8", "dpo.data.num_workers=0", "dpo.data.shuffle_buffer=64", "dpo.validation_pairs=32",
        "dpo.train.cpu=true", "dpo.train.progress=false", "dpo.train.log_every=5", "dpo.train.optim.lr=3.0e-3",
        "dpo.train.optim.warmup_steps=0", "dpo.beta=2000", "dpo.adapter.rank=8", "dpo.adapter.targets=[temporal]",
        f"run.output_dir={tmp}", "run.name=clips", *overrides])


def test_clip_dpo_run_raises_held_out_implicit_accuracy(motion_pairs, base_weights, tmp_path):
    from training.builders import dpo_stage as build_dpo_stage
    from training.runner import run_pipeline

    cfg = _run_cfg(tmp_path, motion_pairs, base_weights, "dpo.train.max_steps=20")
    run = tmp_path / "clips"
    # before training (the adapter starts at ΔW = 0): the held-out pairs score exactly chance
    stage, _ = build_dpo_stage(cfg, run)
    stage.setup(torch.device("cpu"), torch.float32)
    before = stage.objective.validation_scores(stage.model)
    assert before["implicit_acc"] == 0.0 and before["reward_margin"] == 0.0
    assert before["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    batch = stage.objective.val_pairs[0]
    assert tuple(batch.latents.shape[1:]) == tuple(batch.extras["latent_l"].shape[1:]) == (3, 3, 8, 8)  # clips
    assert all(m["clip_frames"] == 3 for m in batch.metadata)

    after = run_pipeline(cfg)["dpo"].metrics  # the same cache, reused
    assert after["val/implicit_acc"] >= 0.8 and after["val/reward_margin"] > 0, after
    assert after["val/dpo_loss"] < math.log(2) - 0.05, after
    meta = json.loads((run / "dpo" / "export" / "adapter.json").read_text())
    assert meta["base_unchanged_verified"] is True and meta["adapter"]["targets"] == ["temporal"]
    assert meta["targets"] and all(t.startswith(("blocks.1.", "blocks.3.")) for t in meta["targets"])


def test_loom_shards_moving_digit_pairs_plan_and_refusal(tmp_path, capsys):
    from data_pipeline.writer import ShardsConfig
    from launch.commands.shards import plan, run

    cfg = ShardsConfig(source="moving-digit-pairs", output_dir=str(tmp_path), progress=False)
    text = plan(cfg)
    assert "1617 train / 180 val" in text and "mp4_0, mp4_1, label_0" in text and "libx264 crf 10" in text
    with pytest.raises(ValueError, match="input: got 'x.jsonl'; the moving-digit-pairs source is bundled"):
        ShardsConfig(source="moving-digit-pairs", input="x.jsonl", output_dir=str(tmp_path))
    (tmp_path / "train-000000.tar").write_bytes(b"")  # an earlier set: refused before anything is written
    assert run(cfg) == 1 and "overwrite=true" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]
