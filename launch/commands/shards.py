"""``loom shards``: write WebDataset shards from a folder, a JSONL/CSV table (images and videos), the bundled digits
demo set, its moving-digits video set or clip preference pairs made from it, or a table of preference pairs.

    loom shards demo output_dir=data/demo
    loom shards moving-digits output_dir=data/moving-digits     # 9-frame 32x32 mp4 clips of the digits moving
    loom shards moving-digit-pairs output_dir=data/motion-prefs  # mp4_0/mp4_1 pairs: captioned motion vs opposite
    loom shards folder input=imgs/ output_dir=out/ max_samples_per_shard=500
    loom shards folder input=videos/ output_dir=out/ split_scenes=true max_size=512 video_max_fps=24
    loom shards table input=pairs.jsonl output_dir=out/ image_column=path caption_column=text
    loom shards pairs input=prefs.parquet output_dir=data/prefs      # Pick-a-Pic layout: caption, jpg_0, jpg_1, label_0
"""

from __future__ import annotations

import sys
from typing import Any

from data_pipeline.sources import VIDEO_SUFFIXES, FolderSource, TableSource
from data_pipeline.writer import ShardsConfig, existing_shard_files, write_shards
from launch.commands import Command


def _format_line(cfg: ShardsConfig) -> str:
    if cfg.source == "demo":
        return "png (lossless)"
    fmt = {"keep": "keep jpg/png/webp as-is, others to png", "jpg": f"jpg (quality {cfg.jpeg_quality})",
           "png": "png"}[cfg.image_format]
    return fmt + (f", longer side at most {cfg.max_size}px" if cfg.max_size else "")


def _video_line(cfg: ShardsConfig) -> str:
    if cfg.source in ("moving-digits", "moving-digit-pairs"):
        from data_pipeline.moving_digits import CRF

        return f"H.264 mp4 (libx264 crf {CRF}, yuv420p), 9 frames at 8 fps, 32x32"
    limits = [f"longer side {cfg.max_size}px" if cfg.max_size else "",
              f"{cfg.video_max_fps:g} fps" if cfg.video_max_fps else ""]
    limits = ", ".join(x for x in limits if x)
    if cfg.video_reencode:
        fmt = f"re-encode all to H.264 mp4 (crf {cfg.video_crf}{'; at most ' + limits if limits else ''})"
    elif limits:
        fmt = f"keep the file as-is; re-encode to H.264 mp4 (crf {cfg.video_crf}) only above {limits}"
    else:
        fmt = "keep the file as-is"
    if cfg.split_scenes:
        fmt += (f"; split at scene cuts (content threshold {cfg.scene_threshold:g}, scenes of at least "
                f"{cfg.min_scene_seconds:g} s) into H.264 clips (crf {cfg.video_crf})")
    if cfg.split_scenes or cfg.motion_score:
        fmt += "; motion_score (Farneback flow at 2 fps) in each json"
    return fmt


def plan(cfg: ShardsConfig) -> str:
    """What ``run(cfg)`` would write (for ``--dry-run``); reads the input only to count it."""
    lines = []
    if cfg.source in ("demo", "moving-digits", "moving-digit-pairs"):
        from data_pipeline.demo import split_sizes

        n_train, n_val = split_sizes(cfg.seed, cfg.val_fraction)
        prefixes = ["train", "val"] if n_val else ["train"]
        what = {"demo": "1797 images as 32x32 RGB, white ink on black",
                "moving-digits": "1797 clips of a digit moving left/right/up/down, 9 frames of 32x32 RGB on black",
                "moving-digit-pairs": "1797 clip preference pairs in the Pick-a-Pic layout (mp4_0, mp4_1, label_0): "
                                      "the digit moving the captioned way preferred to it moving the opposite way"
                }[cfg.source]
        lines.append(f"source: {cfg.source} (scikit-learn digits, {what}), "
                     f"stratified split seed={cfg.seed} val_fraction={cfg.val_fraction}: "
                     f"{n_train} train / {n_val} val")
    else:
        prefixes = [cfg.shard_prefix]
        if cfg.source == "folder":
            files = FolderSource(cfg.input, cfg.allow_empty_caption).files()  # type: ignore[arg-type]
            n_video = sum(f.suffix.lower() in VIDEO_SUFFIXES for f in files)
            counts = f"{len(files) - n_video} image files" + (f" and {n_video} video files" if n_video else "")
            lines.append(f"source: folder {cfg.input} ({counts}; captions from same-stem .txt"
                         f"{', empty allowed' if cfg.allow_empty_caption else ''})")
        elif cfg.source == "pairs":
            from data_pipeline.preference import PairTableSource

            pairs = PairTableSource(cfg.input, cfg.caption_column, cfg.allow_empty_caption)  # type: ignore[arg-type]
            lines.append(f"source: preference pairs {cfg.input} ({pairs.kind}, about {pairs.size_hint()} rows; "
                         f"columns {cfg.caption_column!r}, 'jpg_0', 'jpg_1' or 'mp4_0', 'mp4_1', 'label_0'), "
                         "written in the Pick-a-Pic layout (KEY.jpg_0, KEY.jpg_1 or KEY.mp4_0, KEY.mp4_1, KEY.txt, "
                         "KEY.json with label_0/label_1)")
        else:
            table = TableSource(cfg.input, cfg.image_column, cfg.caption_column,  # type: ignore[arg-type]
                                cfg.allow_empty_caption)
            lines.append(f"source: table {cfg.input} ({table.kind}, about {table.size_hint()} rows; "
                         f"image column {cfg.image_column!r}, caption column {cfg.caption_column!r})")
    names = ", ".join(f"{p}-NNNNNN.tar + {p}.shardindex.json" for p in prefixes)
    lines.append(f"output: {cfg.output_dir}/ {names}")
    lines.append(f"shard size: at most {cfg.max_samples_per_shard} samples per tar")
    if cfg.source not in ("moving-digits", "moving-digit-pairs"):
        lines.append(f"image format: {_format_line(cfg)}")
    if cfg.source != "demo":
        lines.append(f"video format: {_video_line(cfg)}")
    existing = [p for prefix in prefixes for p in existing_shard_files(cfg.output_dir, prefix)]
    if existing:
        action = "will be replaced (overwrite=true)" if cfg.overwrite else "exist: the run will refuse them " \
            "(set overwrite=true)"
        lines.append(f"existing: {len(existing)} file(s) of these shard sets {action}")
    return "\n".join(lines)


def run(cfg: ShardsConfig) -> int:
    """Write the shards; print a summary. Exit code 0, or 1 when nothing could be written or files exist."""
    try:
        summaries: list[Any]
        if cfg.source == "pairs":
            from data_pipeline.preference import PairTableSource, write_preference_shards

            pairs = PairTableSource(cfg.input, cfg.caption_column, cfg.allow_empty_caption)  # type: ignore[arg-type]
            summaries = [write_preference_shards(pairs, cfg.output_dir, cfg.shard_prefix, cfg.writer_options(),
                                                 progress=cfg.progress)]
        elif cfg.source == "demo":
            from data_pipeline.demo import build_demo_set

            summaries = list(build_demo_set(cfg.output_dir, cfg.seed, cfg.val_fraction, cfg.max_samples_per_shard,
                                            cfg.overwrite, cfg.progress).values())
        elif cfg.source == "moving-digit-pairs":
            from data_pipeline.preference import build_moving_digit_pairs

            summaries = list(build_moving_digit_pairs(cfg.output_dir, cfg.seed, cfg.val_fraction,
                                                      cfg.max_samples_per_shard, cfg.overwrite, cfg.progress).values())
        elif cfg.source == "moving-digits":
            from data_pipeline.moving_digits import build_moving_digits

            summaries = list(build_moving_digits(cfg.output_dir, cfg.seed, cfg.val_fraction,
                                                 cfg.max_samples_per_shard, cfg.overwrite, cfg.progress,
                                                 cfg.motion_score).values())
        else:
            if cfg.source == "folder":
                source = FolderSource(cfg.input, cfg.allow_empty_caption)  # type: ignore[arg-type]
            else:
                source = TableSource(cfg.input, cfg.image_column, cfg.caption_column,  # type: ignore[arg-type]
                                     cfg.allow_empty_caption)
            summaries = [write_shards(source, cfg.output_dir, cfg.shard_prefix, cfg.writer_options(),
                                      progress=cfg.progress)]
    except (FileExistsError, ValueError) as e:
        print(f"loom shards: {e}", file=sys.stderr)
        return 1
    for s in summaries:
        print(s.format())
    if not any(s.samples for s in summaries):
        print("loom shards: no samples were written (see the skip reasons above)", file=sys.stderr)
        return 1
    return 0


COMMAND = Command(name="shards", config_cls=ShardsConfig, run=run, plan=plan, positional="source")
