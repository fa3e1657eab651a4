"""The end-of-run report: markdown + PNG grids + ``report.json``, with numbers rather than impressions.

For the digits demo it measures the two things that say the pipeline works: the autoencoder's reconstruction
PSNR on the validation split, and whether the diffusion model draws the digit it is asked for — a digit classifier
fit on the demo training split reads samples for "a handwritten digit zero" … "nine" at each guidance scale
(guidance 0 is the unconditional model, whose accuracy should sit near chance, 10%).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.builders import open_run
from training.evaluation import DigitClassifier, psnr, save_grid
from training.run_config import RunConfig

log = logging.getLogger(__name__)


def _autoencoder_section(cfg: RunConfig, run_dir: Path, ae: Any, lines: list[str], out: dict) -> None:
    from training.builders import first_batches

    if ae is None or not cfg.val_data.source_list():
        return
    with torch.no_grad():
        x = torch.cat([b.pixels for b in first_batches(cfg.val_data, 10_000, 64)])  # every validation image
        device = next(ae.parameters()).device
        recon = torch.cat([ae.decode(ae.encode(chunk.to(device)).mode()).cpu() for chunk in x.split(64)])
        recon = recon.clamp(-1, 1)
    value = psnr(recon, x)
    out["autoencoder_psnr_db"] = value
    grid = save_grid(torch.cat([x[:16], recon[:16]]), run_dir / "report" / "reconstructions.png", nrow=16, scale=3)
    lines += ["## Autoencoder", "",
              f"Reconstruction PSNR on the {len(x)} validation "
              f"{f'clips ({x.shape[2]} frames, {type(ae).__name__})' if x.ndim == 5 else 'images'}: **{value:.2f} dB** "
              f"(latent {ae.config.latent_channels}×{x.shape[-1] // ae.spatial_factor}², "
              f"scaling factor {ae.config.scaling_factor:.4f}).", "",
              f"![reconstructions (top: input, bottom: reconstruction)]({grid.relative_to(run_dir)})", ""]


def _motion_section(cfg: RunConfig, run_dir: Path, pipe: Any, lines: list[str], out: dict) -> None:
    """The moving-digits check (:mod:`training.motion_check`): text-to-video for every digit × direction prompt at
    each guidance scale, and image-to-video from still validation digits when the model takes a first frame."""
    from data_pipeline.demo import load_digits_split
    from data_pipeline.moving_digits import DIRECTIONS, caption_for
    from training.evaluation import save_clip_grid_animation
    from training.motion_check import read_clips, scores

    rep = cfg.report
    frames = rep.num_frames or cfg.diffusion.validation_num_frames or cfg.data.video.num_frames
    clf, clf_acc = DigitClassifier.for_demo(cfg.data.seed)
    n = rep.samples_per_prompt
    digits = np.repeat(np.arange(10), 4 * n)  # (400,) for n = 10: digit-major
    directions = np.tile(np.repeat(np.arange(4), n), 10)  # each digit: n clips per direction
    prompts = [caption_for(int(d), DIRECTIONS[k]) for d, k in zip(digits, directions)]
    lines += ["## Does it move what it is asked to move?", "",
              f"{n} clips of {frames} frames per prompt \"a handwritten digit *d* moving *left/right/up/down*\" "
              f"(40 prompts). **Direction**: the least-squares slope of the ink centroid over the frames (chance "
              f"25%). **Digit**: the demo digit classifier (validation accuracy {clf_acc:.1%}) reads every frame "
              "shifted back to the middle frame's position; the clip's digit is the majority vote. **Consistency**: "
              "clips whose every frame reads as the same digit.", "",
              "| guidance | direction | digit | consistency |", "| --- | --- | --- | --- |"]
    sheets = []
    for g in rep.guidance_scales:
        clips = pipe.generate(prompts, guidance=g, num_frames=frames)  # (B, C, T, H, W)
        got = scores(read_clips(clips, clf), digits, directions)
        for name, value in got.items():
            out[f"t2v_{name}_guidance_{g:g}"] = value
        lines.append(f"| {g:g}{' (unconditional)' if g == 0 else ''} | **{got['direction_accuracy']:.1%}** | "
                     f"**{got['digit_accuracy']:.1%}** | **{got['temporal_consistency']:.1%}** |")
        pick = np.arange(0, len(prompts), n)  # the first clip of each prompt: 40 rows
        sheet = save_grid(clips[pick], run_dir / "report" / f"clips_guidance_{g:g}.png", nrow=len(pick), scale=2)
        save_clip_grid_animation(clips[pick], sheet.with_suffix(".gif"), fps=cfg.diffusion.validation_fps,
                                 nrow=8, scale=2)
        sheets.append((g, sheet))
    lines.append("")
    for g, sheet in sheets:
        lines += [f"Guidance {g:g}: one clip per prompt (digit 0 left, right, up, down; then 1 …), frames in a row; "
                  f"animated: `{sheet.with_suffix('.gif').relative_to(run_dir)}`", "",
                  f"![clips at guidance {g:g}]({sheet.relative_to(run_dir)})", ""]
    if not pipe.image_conditioned:
        return
    _, _, xva, yva = load_digits_split(cfg.data.seed)
    per = rep.first_frames_per_digit
    chosen = np.concatenate([np.flatnonzero(yva == d)[:per] for d in range(10)])  # per digit, the first `per`
    firsts = torch.from_numpy(xva[chosen]).float().permute(0, 3, 1, 2) / 127.5 - 1  # (10*per, 3, 32, 32)
    firsts = firsts.repeat_interleave(4, dim=0)  # each still animated in the four directions
    i_digits = np.repeat(yva[chosen], 4)
    i_dirs = np.tile(np.arange(4), len(chosen))
    i_prompts = [caption_for(int(d), DIRECTIONS[k]) for d, k in zip(i_digits, i_dirs)]
    g = max(rep.guidance_scales)
    clips = pipe.generate(i_prompts, guidance=g, num_frames=frames, first_frames=firsts)
    got = scores(read_clips(clips, clf), i_digits, i_dirs)
    for name, value in got.items():
        out[f"i2v_{name}_guidance_{g:g}"] = value
    sheet = save_grid(clips, run_dir / "report" / "image_to_video.png", nrow=len(clips), scale=2)
    lines += ["## Image-to-video", "",
              f"{len(chosen)} still digits of the validation split (not trained on), each the first frame of four "
              f"clips, one per direction, at guidance {g:g}: the clip keeps the digit **{got['digit_accuracy']:.1%}**"
              f", moves as prompted **{got['direction_accuracy']:.1%}**, consistent "
              f"**{got['temporal_consistency']:.1%}**.", "", f"![image to video]({sheet.relative_to(run_dir)})", ""]


def write_report(cfg: RunConfig, run_dir: Path) -> Path:
    from data_pipeline.demo import caption_for_digit

    start = time.perf_counter()
    pipe = open_run(run_dir, weights="export", device=cfg.device, cfg=cfg)
    model = pipe.denoiser

    out: dict[str, Any] = {"run": str(run_dir)}
    lines = [f"# latentloom report — {cfg.run.name}", "",
             f"Stages: {' → '.join(cfg.pipeline)}. Denoiser: {cfg.diffusion.denoiser} "
             f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), process "
             f"{cfg.diffusion.process.kind}/{cfg.diffusion.process.prediction}, "
             f"sampler {cfg.diffusion.sampling.sampler} {cfg.diffusion.sampling.steps} steps, EMA weights.", ""]
    _autoencoder_section(cfg, run_dir, pipe.autoencoder, lines, out)

    if cfg.report.digits_check:
        clf, clf_acc = DigitClassifier.for_demo(cfg.data.seed)
        n = cfg.report.samples_per_digit
        labels = np.repeat(np.arange(10), n)
        prompts = [caption_for_digit(int(d)) for d in labels]
        lines += ["## Does it draw the digit it is asked for?", "",
                  f"A digit classifier (RBF SVM on 8×8 pooled pixels) fit on the demo training split reads "
                  f"{n} samples per prompt \"a handwritten digit zero\" … \"nine\" (its own accuracy on the "
                  f"validation split: {clf_acc:.1%}). Chance is 10%.", "",
                  "| guidance | accuracy | per digit 0–9 |", "| --- | --- | --- |"]
        out["classifier_val_accuracy"] = clf_acc
        grids = []
        for g in cfg.report.guidance_scales:
            images = pipe.generate(prompts, guidance=g)
            pred = clf.predict(images)
            acc = float((pred == labels).mean())
            per = [float((pred[labels == d] == d).mean()) for d in range(10)]
            out[f"digit_accuracy_guidance_{g:g}"] = acc
            out[f"per_digit_accuracy_guidance_{g:g}"] = per
            lines.append(f"| {g:g}{' (unconditional)' if g == 0 else ''} | **{acc:.1%}** | "
                         f"{' '.join(f'{p:.0%}' for p in per)} |")
            grids.append((g, save_grid(images, run_dir / "report" / f"samples_guidance_{g:g}.png", nrow=n, scale=3)))
        lines.append("")
        for g, path in grids:
            lines += [f"Guidance {g:g} (row d asks for digit d):", "", f"![samples at guidance {g:g}]"
                      f"({path.relative_to(run_dir)})", ""]
    if cfg.report.motion_check:
        _motion_section(cfg, run_dir, pipe, lines, out)
    out["report_seconds"] = time.perf_counter() - start
    (run_dir / "report.json").write_text(json.dumps(out, indent=1))
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    log.info("report written to %s", path)
    return path
