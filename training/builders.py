"""Builders shared by the stage runner, the report, ``loom sample`` and the benchmarks: the device and process
position, the frozen text encoder and autoencoder of a run, its training and validation data, and each
denoiser-training stage (``diffusion``, ``lora``, ``dpo``) as a run config describes it.

Nothing here runs a stage: :mod:`training.runner` does, and :mod:`training.inference` opens a finished run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from data_pipeline.data_config import DataConfig
from data_pipeline.loader import build_loader
from models.autoencoder import AutoencoderKL
from models.text_encoder import TextEncoder, TextEncoderConfig
from training.inference import Inference, denoiser_weights, load_denoiser_weights
from training.run_config import RunConfig
from training.sampling import SamplingConfig
from training.sharding import wait_for_main_process
from training.stages.autoencoder import load_exported_autoencoder
from training.stages.cache import (
    cache_data_config,
    cache_dir,
    data_signature,
    file_identity,
    in_run_dir,
    reuse_or_build,
)
from training.stages.diffusion import DiffusionStage

log = logging.getLogger(__name__)


def pick_device(choice: Optional[str]) -> torch.device:
    if choice is not None:
        return torch.device(choice)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def distributed_position() -> tuple[int, int]:
    """(rank, world size) as the launcher set them (1 process when not launched by torchrun/accelerate).

    This usually creates Accelerate's process state, before any Trainer does. Without a GPU it must ask for the CPU
    (gloo): ``PartialState()`` alone treats torchrun's workers on a CPU-only machine as separate single processes,
    each "rank 0 of 1", all writing the same run directory.
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes


def build_text_encoder(cfg: TextEncoderConfig, run_dir: Path, seed: int) -> TextEncoder:
    """The frozen text encoder; a randomly initialised one is saved once in the run and reloaded by later stages,
    so every stage (and ``loom sample``) sees the same weights."""
    if cfg.pretrained is None and cfg.checkpoint is None:
        path = run_dir / "text_encoder.safetensors"
        if not path.exists():
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                encoder = TextEncoder(cfg)
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # every rank writes the same bytes: rename
            encoder.save_checkpoint(tmp)
            os.replace(tmp, path)
        cfg = dataclasses.replace(cfg, checkpoint=str(path))
    return TextEncoder(cfg)


def exported_autoencoder_path(run_dir: Path) -> Path:
    return run_dir / "autoencoder" / "export" / "model.safetensors"


def load_autoencoder(weights: str | Path) -> nn.Module:
    """An exported autoencoder, frozen in eval mode: ``model.safetensors`` with its config ``model.json`` beside it,
    rebuilt through the model registry as the architecture the json records (``autoencoder-kl`` when it records
    none: exports made before video autoencoders), e.g. :class:`~models.autoencoder.AutoencoderKL`,
    :class:`~models.video_autoencoder.TemporalDecoderAutoencoder` or
    :class:`~models.video_autoencoder.CausalAutoencoder3D`."""
    return load_exported_autoencoder(weights).eval().requires_grad_(False)


def first_batches(data: DataConfig, n_samples: int, batch_size: int) -> list[Any]:
    """The first ``n_samples`` samples of ``data`` in a fixed order (validation), as batches."""
    fixed = dataclasses.replace(data, shuffle_buffer=0, shard_shuffle=False, resampled=False, epoch_samples=None,
                                crop="center", flip=False, num_workers=0, batch_size=batch_size, full_pass=True)
    out, seen = [], 0
    for batch in build_loader(fixed, rank=0, world_size=1):
        out.append(batch)
        seen += len(batch)
        if seen >= n_samples:
            break
    return out


def square(resolution: int) -> tuple[int, int]:
    """The ``(height, width)`` of the square images a data config's ``resolution`` makes."""
    return resolution, resolution


def with_batch(data: DataConfig, batch_size: Optional[int]) -> DataConfig:
    return data if batch_size is None else dataclasses.replace(data, batch_size=batch_size)


def resolve_autoencoder(cfg: RunConfig, run_dir: Path) -> Optional[nn.Module]:
    """The frozen autoencoder of the denoising stages (any registered autoencoder architecture), None for a
    pixel-space denoiser."""
    if cfg.diffusion.latents == "pixels":
        return None
    weights = cfg.diffusion.autoencoder_weights
    path = exported_autoencoder_path(run_dir) if weights == "auto" else Path(weights)
    if not path.exists():
        raise FileNotFoundError(
            f"diffusion.autoencoder_weights={weights!r}: {path} does not exist; run the autoencoder stage first "
            "(pipeline: [autoencoder, cache, diffusion]) or point autoencoder_weights at an exported autoencoder"
        )
    from training.pretrained import load_autoencoder_any  # also a diffusers VAE folder or an original single file

    return load_autoencoder_any(path)


def encoder_signature(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """What identifies the frozen encoders a cache is made with (see :func:`training.stages.cache.reuse_or_build`):
    the autoencoder file (path and content digest: a retrained one differs) and the text encoder's config and seed."""
    ae = None
    if cfg.diffusion.latents != "pixels":
        weights = cfg.diffusion.autoencoder_weights
        path = exported_autoencoder_path(run_dir) if weights == "auto" else Path(weights)
        from training.pretrained import autoencoder_weights_file

        ae = file_identity(autoencoder_weights_file(path)) if path.exists() else str(path)
    return {"autoencoder": ae, "text_encoder": dataclasses.asdict(cfg.diffusion.text_encoder), "seed": cfg.run.seed}


def diffusion_stage(cfg: RunConfig, run_dir: Path, with_validation_data: bool = True) -> tuple[DiffusionStage, Any]:
    """The diffusion stage as configured (frozen parts loaded) and its training data config."""
    st = cfg.diffusion
    te, ae = frozen_parts(cfg, run_dir)
    train_data, val_batches = training_data(cfg, run_dir, with_validation_data)
    torch.manual_seed(cfg.run.seed)
    stage = DiffusionStage(st, te, ae, square(cfg.data.resolution), val_batches)
    return stage, with_batch(train_data, st.batch_size)


def training_data(cfg: RunConfig, run_dir: Path, with_validation_data: bool) -> tuple[DataConfig, list]:
    """The image (or cached-latent) training data of the diffusion and lora stages, and the validation batches."""
    if cfg.diffusion.latents == "cache":
        train_data = cache_data_config(cache_dir(run_dir, cfg.cache), "train", cfg.data)
        val_data = cache_data_config(cache_dir(run_dir, cfg.cache), "val", cfg.val_data)
        has_val = (cache_dir(run_dir, cfg.cache) / "val.shardindex.json").exists()
    else:
        train_data, val_data, has_val = cfg.data, cfg.val_data, bool(cfg.val_data.source_list())
    val_batches = []
    if with_validation_data and has_val:
        val_batches = first_batches(val_data, cfg.diffusion.validation_loss_batches * 64, 64)
    return train_data, val_batches


def finetune_base_weights(cfg: RunConfig, run_dir: Path) -> str:
    """The denoiser weights the ``lora`` / ``dpo`` stages start from: this run's diffusion export when the run
    trains the denoiser (or already holds an export and ``diffusion.weights`` is unset), else ``diffusion.weights``."""
    export = run_dir / "diffusion" / "export" / "model.safetensors"
    if "diffusion" in cfg.pipeline or (not cfg.diffusion.weights and export.exists()):
        if not export.exists():
            raise FileNotFoundError(f"fine-tuning needs the diffusion stage's export {export}; it is missing")
        return str(export)
    if not cfg.diffusion.weights and cfg.diffusion.pretrained:
        return cfg.diffusion.pretrained  # the checkpoint's own denoiser (training.pretrained)
    if not cfg.diffusion.weights:
        raise FileNotFoundError("fine-tuning (lora/dpo) needs base denoiser weights: set diffusion.weights to an "
                                "exported model.safetensors (e.g. runs/quickstart/diffusion/export/model.safetensors)")
    if not Path(cfg.diffusion.weights).exists():
        raise FileNotFoundError(f"diffusion.weights={cfg.diffusion.weights!r} does not exist")
    return cfg.diffusion.weights


def frozen_parts(cfg: RunConfig, run_dir: Path) -> tuple[TextEncoder, Optional[AutoencoderKL]]:
    """The frozen text encoder and autoencoder (None for a pixel-space denoiser) of the denoising stages."""
    from training.pretrained import class_label_encoder  # a class-conditional DiT reads class ids, not text

    text = class_label_encoder(cfg.diffusion) or build_text_encoder(cfg.diffusion.text_encoder, run_dir, cfg.run.seed)
    return text, resolve_autoencoder(cfg, run_dir)


def lora_stage(cfg: RunConfig, run_dir: Path, with_validation_data: bool = True) -> tuple[Any, DataConfig]:
    """The ``lora`` stage as configured (base weights loaded, adapter attached) and its training data config."""
    from training.stages.lora import finetune_diffusion_config, make_lora_stage

    st = cfg.diffusion
    weights = finetune_base_weights(cfg, run_dir)
    te, ae = frozen_parts(cfg, run_dir)
    train_data, val_batches = training_data(cfg, run_dir, with_validation_data)
    torch.manual_seed(cfg.run.seed)  # the adapter's initialisation
    dcfg = finetune_diffusion_config(st, weights, cfg.lora.cond_dropout, cfg.lora.validation_prompts)
    stage = make_lora_stage(dcfg, cfg.lora, te, ae, square(cfg.data.resolution), val_batches)
    return stage, with_batch(train_data, cfg.lora.batch_size)


def cache_dpo_pairs(cfg: RunConfig, run_dir: Path, te: TextEncoder, ae: Optional[AutoencoderKL]) -> Path:
    """Encode the preference shards once (rank 0; the others wait): ``train`` from ``dpo.data``, ``val`` from
    ``dpo.val_data``. A cache written from the same shards and settings is reused."""
    from training.stages.dpo import cache_preference_pairs

    st = cfg.dpo
    out = in_run_dir(run_dir, st.cache)
    distributed_position()  # the process group exists before the wait below

    def encode() -> None:
        device = pick_device(cfg.device)
        te.to(device)
        if ae is not None:
            ae.to(device)

        def build(data: DataConfig, prefix: str) -> None:
            n, skips = cache_preference_pairs(data, prefix, out, ae, te, st.ties, device, st.cache_dtype)
            if n == 0:
                raise ValueError(f"dpo.{'data' if prefix == 'train' else 'val_data'}: no usable preference pair "
                                 f"in {data.urls or data.sources} (skipped: {skips.format()})")

        for prefix, data in (("train", st.data), ("val", st.val_data)):
            if data.source_list():
                signature = {"data": data_signature(data), "ties": st.ties, "dtype": st.cache_dtype,
                             **encoder_signature(cfg, run_dir)}
                reuse_or_build(out, prefix, signature, functools.partial(build, data, prefix))

    # rank 0 encodes; the others wait however long that takes (a plain barrier would hit the collective timeout)
    wait_for_main_process(encode)
    return out


def dpo_stage(cfg: RunConfig, run_dir: Path, with_validation_data: bool = True) -> tuple[Any, DataConfig]:
    """The ``dpo`` stage (pairs cached first) and the data config streaming the cached training pairs."""
    from training.stages.dpo import make_dpo_stage, pair_cache_data_config
    from training.stages.lora import finetune_diffusion_config

    st = cfg.dpo
    weights = finetune_base_weights(cfg, run_dir)
    te, ae = frozen_parts(cfg, run_dir)
    out = cache_dpo_pairs(cfg, run_dir, te, ae)
    val_pairs = []
    if with_validation_data and st.validation_pairs and (out / "val.shardindex.json").exists():
        val_pairs = first_batches(pair_cache_data_config(out, "val", st.val_data), st.validation_pairs, 64)
    torch.manual_seed(cfg.run.seed)  # the adapter's initialisation
    dcfg = finetune_diffusion_config(cfg.diffusion, weights, st.cond_dropout, st.validation_prompts)
    stage = make_dpo_stage(dcfg, st, te, ae, square(st.data.resolution), val_pairs)
    return stage, with_batch(pair_cache_data_config(out, "train", st.data), st.batch_size)


def run_config_of(run_dir: str | Path) -> Any:
    """The resolved ``RunConfig`` a ``loom train`` run wrote into ``run_dir/config.yaml``, pointing at ``run_dir``."""
    from training.config_io import load_config

    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"run_dir={str(run_dir)!r}: no config.yaml there (is it a `loom train` run?)")
    cfg = load_config(RunConfig, [path])
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(run_dir.parent),
                                                            name=run_dir.name))


def open_run(run_dir: str | Path, weights: str = "export", device: Optional[str | torch.device] = None,
             sampling: Optional[SamplingConfig] = None, adapters: Sequence[str] = (),
             merge_adapters: bool = True, cfg: Any = None) -> Inference:
    """An :class:`~training.inference.Inference` for a trained run: its config, frozen text encoder and autoencoder,
    the denoiser with ``weights`` (:data:`training.inference.WEIGHTS_CHOICES`), LoRA ``adapters`` (``path[:scale]``,
    added up; merged into the weights unless ``merge_adapters`` is False; a diffusers / kohya file's text-encoder
    layers are always merged into the text encoder: :func:`training.inference.apply_adapters`), on ``device``
    (default: CUDA when available), in eval mode. ``cfg`` is the run's ``RunConfig`` when the caller holds it
    (default: read back from ``run_dir/config.yaml``)."""
    from training.diffusion import build_process
    from training.stages.diffusion import build_denoiser, sdxl_fourier_dim

    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else run_config_of(run_dir)
    path, is_ema = denoiser_weights(run_dir, weights)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    st = cfg.diffusion
    text_encoder, autoencoder = frozen_parts(cfg, run_dir)
    pipe = Inference(build_denoiser(dataclasses.replace(st, weights=None, pretrained=None)), build_process(st.process),
                     text_encoder, autoencoder, sampling or st.sampling, (cfg.data.resolution, cfg.data.resolution),
                     sdxl_fourier_dim(st), size_conditioning=st.micro_conditioning)
    load_denoiser_weights(pipe.denoiser, path, is_ema)
    if adapters:  # a diffusers / kohya file's text-encoder layers are merged into the text encoder
        from training.inference import apply_adapters

        apply_adapters(pipe, adapters, merge_adapters)
    pipe.denoiser.eval()
    return pipe.to(pick_device(None if device is None else str(device)))
