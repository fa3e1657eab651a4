"""Evidence for the video autoencoder stage: the image autoencoder used frame by frame vs a video autoencoder
fine-tuned from it, on held-out moving-digit clips.

    loom train --config video-autoencoder                               # ~3 min CPU (configs/video-autoencoder.yaml)
    python benchmarks/video_autoencoder_evidence.py runs/video-autoencoder
    python benchmarks/video_autoencoder_evidence.py runs/video-autoencoder --frames 9   # longer clips than trained

Both autoencoders encode each validation clip (the run's ``val_data``: the moving-digits validation split, never
trained on; centred clips of ``--frames`` frames) and decode the posterior mean; the image autoencoder is the one
the run's ``autoencoder.inflate_from`` names (default: the image quickstart's). Measured per model:

* **clip PSNR** (dB): :func:`training.evaluation.psnr` over each clip's pixels and frames, averaged over clips;
* **flicker**: :func:`training.evaluation.temporal_flicker`, the mean absolute difference between the
  reconstruction's frame-to-frame changes and the original's, in the [-1, 1] pixel scale (lower: the
  reconstruction changes from frame to frame as the clip does; a per-frame autoencoder's independent errors
  flicker);
* the same two on the *static* version of each clip (its first frame repeated): there any frame-to-frame change
  of the reconstruction is flicker (0 for a per-frame autoencoder, whose identical frames decode identically).

``--compare NAME=EXPORT`` adds other exported autoencoders to the table, e.g. the control that isolates the temporal
layers: the image autoencoder's decoder fine-tuned frame by frame on the same clips and steps::

    loom train --config video-autoencoder run.name=video-autoencoder-per-frame autoencoder.architecture=autoencoder-kl \
        autoencoder.inflate_from=null autoencoder.weights=runs/quickstart/autoencoder/export/model.safetensors \
        autoencoder.model.block_out_channels=[16,32,32] autoencoder.model.layers_per_block=1 \
        autoencoder.model.norm_num_groups=8 autoencoder.model.scaling_factor=0.4497634768486023
    python benchmarks/video_autoencoder_evidence.py runs/video-autoencoder \
        --compare per-frame-finetuned=runs/video-autoencoder-per-frame/autoencoder/export/model.safetensors

Prints a table with the video/image ratios, writes the numbers to ``<run>/evidence/video_autoencoder_<T>f.json``
and a contact sheet of 4 clips (rows per clip: the original, then each autoencoder in the table's order) beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.builders import first_batches, load_autoencoder, run_config_of  # noqa: E402
from training.evaluation import psnr, save_grid, temporal_flicker  # noqa: E402
from training.stages.autoencoder import read_autoencoder_export  # noqa: E402

QUICKSTART_AE = "runs/quickstart/autoencoder/export/model.safetensors"


@torch.no_grad()
def reconstruct(ae: torch.nn.Module, clips: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Posterior-mean reconstructions of ``clips`` (B, C, T, H, W), clamped to [-1, 1]."""
    return torch.cat([ae.decode(ae.encode(part).mode()).clamp(-1, 1) for part in clips.split(chunk)])


def measure(ae: torch.nn.Module, clips: torch.Tensor) -> dict[str, float]:
    recon = reconstruct(ae, clips)
    target = clips[:, :, : recon.shape[2]]  # a causal autoencoder keeps 1 + r·k frames
    static = clips[:, :, :1].expand_as(clips).contiguous()
    static_recon = reconstruct(ae, static)
    return {"psnr_db": psnr(recon, target), "flicker": temporal_flicker(recon, target),
            "static_psnr_db": psnr(static_recon, static[:, :, : static_recon.shape[2]]),
            "static_flicker": temporal_flicker(static_recon, static[:, :, : static_recon.shape[2]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished video-autoencoder run directory (its autoencoder/export)")
    parser.add_argument("--image", default=None, help="the image autoencoder export (default: the run's "
                        f"autoencoder.inflate_from, else {QUICKSTART_AE})")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default: the run's val_data)")
    parser.add_argument("--clips", type=int, default=10_000, help="validation clips measured (default: all)")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=EXPORT",
                        help="another exported autoencoder to measure (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    run = Path(args.run)
    cfg = run_config_of(run)
    image_path = args.image or cfg.autoencoder.inflate_from or QUICKSTART_AE
    video_path = run / "autoencoder" / "export" / "model.safetensors"
    frames = args.frames or cfg.val_data.video.num_frames
    val = dataclasses.replace(cfg.val_data, video=dataclasses.replace(cfg.val_data.video, num_frames=frames,
                                                                      clip_start="center"),
                              buckets=dataclasses.replace(cfg.val_data.buckets, frames=[frames]))
    clips = torch.cat([b.pixels for b in first_batches(val, args.clips, 64)])[: args.clips]
    models = {"image (per frame)": load_autoencoder(image_path), "video": load_autoencoder(video_path)}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--compare {item!r}: expected NAME=EXPORT")
        models[name] = load_autoencoder(path)
    arch = read_autoencoder_export(video_path)[0].name

    results, started = {}, time.perf_counter()
    for name, ae in models.items():
        results[name] = measure(ae, clips)
    seconds = time.perf_counter() - started
    img = results["image (per frame)"]
    print(f"{len(clips)} held-out clips of {frames} frames, {clips.shape[-2]}x{clips.shape[-1]} "
          f"(video autoencoder: {arch}, {video_path}; image: {image_path}); measured in {seconds:.1f} s")
    print(f"{'':22s} {'PSNR dB':>9s} {'flicker':>9s} {'static PSNR':>12s} {'static flicker':>15s}")
    for name, r in results.items():
        print(f"{name:22s} {r['psnr_db']:9.2f} {r['flicker']:9.4f} {r['static_psnr_db']:12.2f} "
              f"{r['static_flicker']:15.4f}")
    for name, r in results.items():
        if name != "image (per frame)":
            print(f"{name} vs image: PSNR {r['psnr_db'] - img['psnr_db']:+.2f} dB, flicker ratio "
                  f"{r['flicker'] / img['flicker']:.3f}")

    out = run / "evidence"
    out.mkdir(parents=True, exist_ok=True)
    show = clips[:4]
    rows = [show] + [reconstruct(ae, show) for ae in models.values()]
    t = min(r.shape[2] for r in rows)
    sheet = torch.stack([r[:, :, :t] for r in rows], dim=1).flatten(0, 1)  # per clip: original, image, video
    save_grid(sheet, out / f"video_autoencoder_{frames}f.png", scale=3)
    record = {"run": str(run), "image_autoencoder": str(image_path), "video_autoencoder": str(video_path),
              "architecture": arch, "clips": len(clips), "frames": frames, "results": results}
    (out / f"video_autoencoder_{frames}f.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
