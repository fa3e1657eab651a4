"""``loom sample``: images from a trained run and prompts, into a PNG grid (one row per prompt).

    loom sample run_dir=runs/quickstart prompts='["a handwritten digit seven", "a handwritten digit two"]'
    loom sample run_dir=runs/quickstart prompts='[...]' sampling.guidance=5 sampling.steps=100 sampling.seed=3
    loom sample run_dir=runs/quickstart weights=latest sampling.negative_prompt="a handwritten digit one"
    loom sample run_dir=runs/quickstart --lora runs/lora-mirrored/lora/export/adapter.safetensors:0.8
    loom sample run_dir=runs/quickstart lora='["runs/lora-mirrored/lora/export/adapter.safetensors:0.8"]'  # the same
    loom sample run_dir=runs/quickstart lora='["a.safetensors:0.8", "b.safetensors:0.5"]'   # combined adapters
    loom sample run_dir=runs/video prompts='["a handwritten digit three moving left"]' num_frames=9 fps=8  # clips
    loom sample run_dir=runs/quickstart-video image=first.png prompts='["a handwritten digit three moving up"]' \
        num_frames=5                                # image-to-video: the clips start from first.png
    loom sample pretrained=path/to/stable-diffusion-folder prompts='["a photo of a cat"]' output=cat.png
                                                    # straight from a checkpoint (training.pretrained), no run

The architecture, text encoder and autoencoder come from the run's ``config.yaml``; ``weights`` picks the exported
EMA weights (``export``), the latest checkpoint's EMA (``latest``), or any ``.safetensors`` file. ``lora`` attaches
LoRA adapters written by the ``lora`` / ``dpo`` stages (``path:scale``; scale 1 when omitted) on top of those weights:
several adapters add up, each scaled; ``lora_merge`` folds them into the weights before sampling (same images,
plain-Linear speed).

With ``num_frames`` the run draws clips: ``output`` becomes a PNG contact sheet (one clip per row, its frames left
to right), and beside it each clip is an mp4 (``<stem>-p<prompt>-<n>.mp4``, H.264) and each prompt's clips an
animated grid (``<stem>-p<prompt>.gif``). ``image`` (an image-to-video run: a denoiser trained with
``concat_image_latents``) is the first frame every clip starts from, resized and centre-cropped to the clips' size.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from launch.commands import Command
from training.sampling import SamplingConfig


@dataclass
class SampleCommandConfig:
    """What to draw, from which run."""

    run_dir: str = "runs/quickstart"  # a training run directory (holds config.yaml and the diffusion stage)
    # instead of a run: a checkpoint (diffusers pipeline folder, original SD single file, DiT .pt); output is then
    # relative to the working directory, and image size, sampler and process come from its files
    pretrained: Optional[str] = None
    # with pretrained: more diffusion-stage settings, e.g. {text_encoder: {format: hf-clip, pretrained: FOLDER}}
    diffusion: dict[str, Any] = field(default_factory=dict)
    weights: str = "export"  # export (EMA export of the finished stage) | latest (EMA of the last checkpoint) | path
    prompts: list[str] = field(default_factory=lambda: ["a handwritten digit seven"])  # one grid row each
    num_per_prompt: int = 4  # images per prompt (grid columns)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # sampler, steps, guidance, seed, negative prompt
    height: Optional[int] = None  # image height in pixels (null: the run's data.resolution)
    width: Optional[int] = None  # image width in pixels (null: the run's data.resolution)
    output: str = "samples.png"  # the PNG grid (relative paths are inside run_dir)
    num_frames: Optional[int] = None  # draw clips of this many frames (null: images)
    image: Optional[str] = None  # image-to-video: the first frame (PNG/JPEG/WebP) every clip starts from
    fps: float = 8.0  # frame rate of the written clips (mp4, animated grid)
    device: Optional[str] = None  # cpu | cuda (null: cuda when available)
    lora: list[str] = field(default_factory=list)  # LoRA adapters "path.safetensors:scale" (scale 1 if omitted)
    lora_merge: bool = True  # merge the adapters into the weights before sampling (else run them unmerged)

    def __post_init__(self) -> None:
        import math

        from training.finetune import AdapterSpec

        for entry in self.lora:
            spec = AdapterSpec.parse(entry)
            if not spec.path or not math.isfinite(spec.scale):
                raise ValueError(f"lora: {entry!r}; expected 'path.safetensors' or 'path.safetensors:scale'")
        if not self.prompts:
            raise ValueError("prompts: empty; give at least one prompt")
        if self.num_per_prompt < 1:
            raise ValueError(f"num_per_prompt: {self.num_per_prompt} must be >= 1")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames: {self.num_frames} must be >= 1 or null")
        if not self.fps > 0:
            raise ValueError(f"fps: {self.fps} must be > 0")
        if self.image is not None and self.num_frames is None:
            raise ValueError(f"image={self.image!r} animates a first frame: give num_frames too")
        if self.image is not None and not Path(self.image).is_file():
            raise ValueError(f"image={self.image!r}: no such file")


def _weights_path(cfg: SampleCommandConfig) -> tuple[Path, bool]:
    """(file, is_checkpoint_ema)."""
    from training.inference import denoiser_weights

    return denoiser_weights(cfg.run_dir, cfg.weights)


def _adapter_specs(cfg: SampleCommandConfig) -> list:
    from training.finetune import AdapterSpec

    return [AdapterSpec.parse(entry) for entry in cfg.lora]


def plan(cfg: SampleCommandConfig) -> str:
    if cfg.pretrained:
        from training.pretrained import read_pretrained

        try:
            what = read_pretrained(cfg.pretrained).describe()
        except (FileNotFoundError, ValueError) as e:
            what = f"none ({e})"
        return f"checkpoint: {what}\nprompts: {len(cfg.prompts)} x {cfg.num_per_prompt}\noutput: {cfg.output}"
    try:
        path: Any = _weights_path(cfg)[0]
    except FileNotFoundError as e:
        path = f"none ({e})"
    s = cfg.sampling
    adapters = "".join(f"\nLoRA adapter: {a.path} x {a.scale:g}" for a in _adapter_specs(cfg))
    if adapters:
        adapters += "\nadapters " + ("merged into the weights" if cfg.lora_merge else "applied unmerged")
    what = "images" if cfg.num_frames is None else f"clips of {cfg.num_frames} frames at {cfg.fps:g} fps"
    if cfg.image is not None:
        what += f" starting from {cfg.image}"
    return (f"weights: {path}{adapters}\nprompts: {len(cfg.prompts)} x {cfg.num_per_prompt} {what}\n"
            f"sampler: {s.sampler} {s.steps} steps, guidance {s.guidance}, seed {s.seed}, "
            f"negative prompt {s.negative_prompt!r}\noutput: {Path(cfg.run_dir) / cfg.output}")


def read_first_frame(path: str, height: int, width: int) -> Any:
    """The image file ``path`` as a ``(1, 3, height, width)`` tensor in [-1, 1]: RGB (EXIF orientation applied),
    scaled to cover ``height × width`` and centre-cropped, as the training data was."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        scale = max(height / im.height, width / im.width)
        size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.BICUBIC)
        left, top = (im.width - width) // 2, (im.height - height) // 2
        im = im.crop((left, top, left + width, top + height))
        array = np.asarray(im, dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1  # (1, 3, H, W)


def run(cfg: SampleCommandConfig) -> int:
    from training.builders import open_run
    from training.evaluation import save_clip_grid_animation, save_clip_mp4, save_grid

    try:
        if cfg.pretrained:
            from training.pretrained import open_pretrained

            pipe = open_pretrained(cfg.pretrained, device=cfg.device, sampling=cfg.sampling, diffusion=cfg.diffusion,
                                   adapters=cfg.lora, merge_adapters=cfg.lora_merge)
        else:
            pipe = open_run(cfg.run_dir, weights=cfg.weights, device=cfg.device, sampling=cfg.sampling,
                            adapters=cfg.lora, merge_adapters=cfg.lora_merge)
    except (FileNotFoundError, ValueError) as e:
        print(f"loom sample: {e}", file=sys.stderr)
        return 1
    if cfg.lora:
        print("LoRA: " + ", ".join(f"{a.path} x {a.scale:g}" for a in _adapter_specs(cfg))
              + (" (merged)" if cfg.lora_merge else " (unmerged)"))
    height, width = cfg.height or pipe.image_size[0], cfg.width or pipe.image_size[1]
    f = 1 if pipe.autoencoder is None else pipe.autoencoder.spatial_factor
    if height % f or width % f:
        print(f"loom sample: height/width must be multiples of the autoencoder factor {f}", file=sys.stderr)
        return 2
    patch = getattr(getattr(pipe.denoiser, "config", None), "patch_size", None) or 1  # a DiT's latent patches
    patch = int(patch[-1] if isinstance(patch, (tuple, list)) else patch)  # (t, h, w) patches: the spatial one
    if height % (f * patch) or width % (f * patch):
        print(f"loom sample: height={height}, width={width}: must be multiples of {f * patch} (the autoencoder "
              f"factor {f} x the DiT's patch size {patch})", file=sys.stderr)
        return 2
    prompts = [p for p in cfg.prompts for _ in range(cfg.num_per_prompt)]
    first = None
    if cfg.image is not None:
        try:
            first = read_first_frame(cfg.image, height, width).expand(len(prompts), -1, -1, -1)
            images = pipe.generate(prompts, height=height, width=width, num_frames=cfg.num_frames,
                                   first_frames=first)
        except (OSError, ValueError) as e:
            print(f"loom sample: image={cfg.image!r}: {e}", file=sys.stderr)
            return 2
    else:
        images = pipe.generate(prompts, height=height, width=width, num_frames=cfg.num_frames)
    out = save_grid(images, Path(cfg.output if cfg.pretrained else Path(cfg.run_dir) / cfg.output),
                    nrow=cfg.num_per_prompt, scale=2)
    if cfg.num_frames is None:
        print(f"wrote {len(images)} images ({images.shape[-2]}x{images.shape[-1]}) to {out}")
        return 0
    n = cfg.num_per_prompt
    for i in range(len(cfg.prompts)):
        clips = images[i * n:(i + 1) * n]  # (n, C, T, H, W)
        for j, clip in enumerate(clips):
            save_clip_mp4(clip, out.with_name(f"{out.stem}-p{i}-{j}.mp4"), fps=cfg.fps)
        save_clip_grid_animation(clips, out.with_name(f"{out.stem}-p{i}.gif"), fps=cfg.fps, scale=2)
    print(f"wrote {len(images)} clips ({images.shape[2]} frames, {images.shape[-2]}x{images.shape[-1]}): contact "
          f"sheet {out}, one mp4 per clip and one animated grid per prompt beside it")
    return 0


COMMAND = Command(name="sample", config_cls=SampleCommandConfig, run=run, plan=plan,
                  list_flags=(("lora", "lora", "a LoRA adapter file written by the lora or dpo stage, PATH[:SCALE]"),))
