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
              f"Reconstruction PSNR on the {len(x)} validation images: **{value:.2f} dB** "
              f"(latent {ae.config.latent_channels}×{x.shape[-1] // ae.config.downsample_factor}², "
              f"scaling factor {ae.config.scaling_factor:.4f}).", "",
              f"![reconstructions (top: input, bottom: reconstruction)]({grid.relative_to(run_dir)})", ""]


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
    out["report_seconds"] = time.perf_counter() - start
    (run_dir / "report.json").write_text(json.dumps(out, indent=1))
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    log.info("report written to %s", path)
    return path
