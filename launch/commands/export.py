"""``loom export``: a finished run in the layouts other tools load, or a LoRA adapter in diffusers / kohya layout.

    loom export runs/quickstart format=diffusers                  # → runs/quickstart/export-diffusers/
    loom export runs/sd-run format=diffusers out=/models/my-sd    # StableDiffusionPipeline.from_pretrained(out)
    loom export runs/sd-run format=single-file                    # → runs/sd-run/export-single-file.safetensors
    loom export runs/quickstart format=diffusers custom_transformer=true   # a DiT diffusers has no class for
    loom export runs/sd-run format=diffusers --merge-lora runs/sd-run/lora/export/adapter.safetensors:0.8
    loom export lora=runs/sd-run/lora/export/adapter.safetensors format=kohya      # → adapter-kohya.safetensors
    loom export lora=runs/sd-run/lora/export/adapter.safetensors format=diffusers out=my-lora.safetensors

``format=diffusers`` writes a pipeline folder (``model_index.json``, ``unet/`` or ``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) that ``StableDiffusionPipeline`` (or ``PixArtAlphaPipeline``,
``DiTPipeline``) ``.from_pretrained`` loads; ``format=single-file`` one original-layout ``.safetensors``
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``). With ``lora=`` the command converts
an adapter written by the lora / dpo stage (``format=diffusers``: ``pipe.load_lora_weights``; ``format=kohya``:
ComfyUI, A1111). What is not exportable (video models, pixel-space runs, an SDXL-style U-Net) stops with an error
naming the model. :mod:`training.export_formats` has the layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launch.commands import Command

FORMATS = ("diffusers", "single-file", "kohya")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ExportCommandConfig:
    """What to export, in which layout, where."""

    run_dir: Optional[str] = None  # a finished training run (config.yaml + diffusion/export); with lora=: its run
    format: str = "diffusers"  # diffusers | single-file (a run) · diffusers | kohya (a LoRA adapter, lora=)
    out: Optional[str] = None  # the folder / file to write (null: beside the run or the adapter, named by format)
    weights: str = "export"  # export (the EMA export) | latest (EMA of the last checkpoint) | a weights file
    lora: Optional[str] = None  # convert this LoRA adapter (ours, from the lora / dpo stage) instead of a run
    merge_lora: list[str] = field(default_factory=list)  # adapters "path:scale" merged into the exported weights
    dtype: str = "float32"  # tensor dtype written: float32 | float16 | bfloat16
    custom_transformer: bool = False  # a DiT with no diffusers class: write it in the documented LatentLoomDiT layout
    overwrite: bool = False  # replace an existing out

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format: got {self.format!r}; expected diffusers or single-file (a run), diffusers or "
                             "kohya (lora=)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: got {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.lora is None:
            if self.run_dir is None:
                raise ValueError("run_dir: not set; give the run to export (loom export runs/NAME format=diffusers) "
                                 "or lora=ADAPTER to convert an adapter")
            if not (Path(self.run_dir) / "config.yaml").is_file():
                raise ValueError(f"run_dir={self.run_dir!r}: no config.yaml there (is it a `loom train` run?)")
            if self.format == "kohya":
                raise ValueError("format='kohya' is a LoRA layout: give lora=ADAPTER (a run exports as diffusers or "
                                 "single-file)")
        else:
            if self.format == "single-file":
                raise ValueError(f"format='single-file' with lora={self.lora!r}: an adapter exports as diffusers "
                                 "or kohya")
            if not Path(self.lora).is_file():
                raise ValueError(f"lora={self.lora!r}: no such file")
            if self.merge_lora:
                raise ValueError("merge_lora: merges adapters into an exported run; it does not apply with lora=")
        if self.out is not None and self.format == "single-file" and not self.out.endswith(".safetensors"):
            raise ValueError(f"out={self.out!r}: a single file is written as .safetensors")


def output_path(cfg: ExportCommandConfig) -> Path:
    """Where the export goes: ``out``, or ``<run>/export-diffusers`` / ``<run>/export-single-file.safetensors`` /
    ``<adapter stem>-<format>.safetensors`` beside the adapter."""
    if cfg.out is not None:
        return Path(cfg.out)
    if cfg.lora is not None:
        lora = Path(cfg.lora)
        return lora.with_name(f"{lora.stem}-{cfg.format}.safetensors")
    assert cfg.run_dir is not None
    return Path(cfg.run_dir) / ("export-diffusers" if cfg.format == "diffusers" else "export-single-file.safetensors")


def plan(cfg: ExportCommandConfig) -> str:
    if cfg.lora is not None:
        return (f"LoRA adapter {cfg.lora} → {cfg.format} layout, named after the denoiser of "
                f"{cfg.run_dir or 'the run it was written in'}\noutput: {output_path(cfg)}")
    merged = "".join(f"\nmerged LoRA adapter: {a}" for a in cfg.merge_lora)
    return (f"run {cfg.run_dir} (weights {cfg.weights}){merged} → {cfg.format} ({cfg.dtype})\n"
            f"output: {output_path(cfg)}")


def run(cfg: ExportCommandConfig) -> int:
    from training import export_formats as ef

    out = output_path(cfg)
    if cfg.lora is not None:
        path = ef.export_lora(cfg.lora, cfg.format, out, run_dir=cfg.run_dir, overwrite=cfg.overwrite)
        print(f"wrote {cfg.format} LoRA {path}")
        return 0
    assert cfg.run_dir is not None
    if cfg.format == "diffusers":
        path = ef.export_diffusers(cfg.run_dir, out, weights=cfg.weights, dtype=cfg.dtype,
                                   custom_transformer=cfg.custom_transformer, adapters=tuple(cfg.merge_lora),
                                   overwrite=cfg.overwrite)
        import json

        notes = json.loads((path / ef.NOTES_NAME).read_text())
        print(f"wrote {notes['layout']['pipeline']} folder {path} ({notes['layout']['denoiser']}, "
              f"{notes['layout']['scheduler']})")
        for caveat in notes["caveats"]:
            print(f"note: {caveat}")
        return 0
    path = ef.export_single_file(cfg.run_dir, out, weights=cfg.weights, dtype=cfg.dtype,
                                 adapters=tuple(cfg.merge_lora), overwrite=cfg.overwrite)
    print(f"wrote single file {path}")
    return 0


COMMAND = Command(name="export", config_cls=ExportCommandConfig, run=run, plan=plan, positional="run_dir",
                  list_flags=(("merge-lora", "merge_lora",
                               "a LoRA adapter merged into the exported weights, PATH[:SCALE]"),))
