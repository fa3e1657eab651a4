"""The ``dpo`` stage: align a trained denoiser with pairwise preferences by Diffusion-DPO (Wallace et al. 2023).

The stage is the diffusion stage with :class:`DpoObjective` as its objective and, for ``policy: lora``, the
:class:`~training.stages.lora.LoraAdapters` part (:func:`make_dpo_stage`): the same code for any denoiser.

**Objective.** For a caption c with a preferred image x_w and a rejected one x_l, both are noised with the *same*
noise ε and timestep t; the policy ε_θ and the frozen reference ε_ref each predict the noise, giving per-pair
errors ``e = mean ‖ε − ε̂(x_t, t, c)‖²`` (mean over latent elements). With
``Δ = (e_θ(x_w) − e_ref(x_w)) − (e_θ(x_l) − e_ref(x_l))`` the loss is ``−log σ(−β/2 · Δ)``.

Scaling conventions. The paper's eq. 14 has ``−β T ω(λ_t)`` in front of Δ computed with squared *norms*; its code
(github.com/SalesforceAIResearch/DiffusionDPO, ``train.py``) uses per-element *means*, takes ω constant and folds
T into β, and multiplies by ``−0.5 β`` (β = 5000 for SD 1.5, 2500 for SDXL). We follow the code: ``beta`` here is
that ``β`` and the factor is ``−β/2`` with element means, so published β values carry over. Errors are measured in
ε space whatever the denoiser predicts (``error: epsilon``: v-, x0- and flow outputs are converted with the
process's ``to_eps``), which is the paper's formulation; ``error: target`` uses the process's own weighted
training loss per sample instead (e.g. with min-SNR weights).

Logged: ``implicit_acc`` (fraction of clear pairs with ``−β/2·Δ > 0``, i.e. the policy prefers the winner more
than the reference does), ``reward_margin`` (mean ``−β/2·Δ``: the implicit reward r = −β/2·(e_θ − e_ref) of the
winner minus the loser's), ``reward_w``/``reward_l``, and the policy's and reference's MSE on the pairs.

**Ties** (``label_0 = 0.5``) are dropped (``ties: drop``, as the paper does for Pick-a-Pic) or kept: each pair
carries the probability p that its first image is preferred (1, or 0.5 for a tie) and the loss is the soft-label
``−[p log σ(z) + (1 − p) log σ(−z)]``, which for a tie pulls the margin toward 0.

**Reference model.** With ``policy: lora`` the policy is the base with one LoRA adapter and the reference is the
same module with the adapter disabled (peft's ``disable_adapter``): one copy of the base weights. With
``policy: full`` every weight trains and the reference is a frozen copy of the base.

**SFT baseline** (``objective: sft``): the plain diffusion loss on the winners only (the paper's supervised
fine-tuning comparison, DiffusionDPO's ``--sft``).

**Data.** ``dpo.data`` names preference shards in the Pick-a-Pic layout (:mod:`data_pipeline.preference`). The
stage first encodes every usable pair once (rank 0) into ``<run>/<dpo.cache>/``: per pair the winner's and the
loser's autoencoder posterior moments (``latent.npy``, ``latent_l.npy``), the caption's text encoding and the
preference strength; then it streams those through the ordinary loader (shuffle buffer, rank split, exact resume),
drawing fresh latent samples from the moments each time, as the diffusion stage's cache does.

**Clip pairs** (``mp4_0`` / ``mp4_1`` members) go through the same code with a video denoiser: the pair reader
decodes both clips with ``dpo.data.video`` (``num_frames`` at its stride or rate, centred), the per-frame
autoencoder encodes them to ``(2C, T, h, w)`` moments (pixels ``(3, T, H, W)`` for a pixel-space model), the json
records ``clip_frames``, and the objective noises the two clip latents with the same noise and timestep (the
process's token-count shift sees the clip's shape). Pairs whose clips differ in frames or size are skipped and
counted (``mismatched_clips``), as are clips the video decoder refuses.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.data_config import DataConfig
from data_pipeline.errors import SkipSample
from data_pipeline.preference import iter_preference_pairs
from data_pipeline.sampletext import printable, text_problem
from data_pipeline.sources import SkipLog
from data_pipeline.transforms import normalize_pixels, to_uint8_pixels
from data_pipeline.writer import ShardWriter, WriterOptions
from models.conditioning import Conditioning, cat_conditioning, drop_conditioning, trim_together
from training.finetune import LoraAdapterConfig, adapters_disabled
from training.stages.cache import cache_data_config, npy, posterior_moments
from training.stages.diffusion import DiffusionStage, DiffusionStageConfig, StagePart
from training.stages.lora import LoraAdapters
from training.trainer import OptimConfig, TrainConfig

log = logging.getLogger(__name__)

PAIR_EXTRA_KEYS = ["latent_l.npy", "context.npy", "context_mask.npy", "pooled.npy"]


def _dpo_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=500, optim=OptimConfig(lr=1e-4, warmup_steps=20), ema_decay=None,
                       checkpoint_every=250)


@dataclass
class DpoStageConfig:
    """Diffusion-DPO (or the SFT baseline) on preference pairs, starting from the trained denoiser."""

    data: DataConfig = field(default_factory=DataConfig)  # preference shards (Pick-a-Pic layout) + loader settings
    val_data: DataConfig = field(default_factory=DataConfig)  # held-out preference shards (urls '' = none)
    objective: Literal["dpo", "sft"] = "dpo"  # dpo: Diffusion-DPO · sft: diffusion loss on the winners only
    policy: Literal["lora", "full"] = "lora"  # lora: adapter (reference = adapter disabled) · full: every weight
    adapter: LoraAdapterConfig = field(default_factory=LoraAdapterConfig)  # the adapter when policy=lora
    beta: float = 5000.0  # β of the sigmoid loss, DiffusionDPO's convention (−β/2 · Δ of element-mean errors)
    error: Literal["epsilon", "target"] = "epsilon"  # errors in ε space (the paper) or the process's weighted loss
    ties: Literal["drop", "keep"] = "drop"  # label_0 = 0.5 pairs: skip them, or train toward a zero margin
    cond_dropout: float = 0.0  # per-pair probability of the null caption (the same for winner and loser)
    batch_size: Optional[int] = None  # pairs per rank per micro-batch (null: dpo.data.batch_size)
    train: TrainConfig = field(default_factory=_dpo_train_defaults)  # steps, optimizer, EMA
    cache: str = "dpo_cache"  # folder of the encoded pairs (relative paths are inside the run directory)
    cache_dtype: Literal["float16", "float32"] = "float32"  # storage precision of the cached arrays
    cast_base: bool = True  # policy=lora under bf16/fp16: hold the frozen base in that dtype (adapters stay fp32)
    validation_pairs: int = 256  # held-out pairs scored at fixed noise at each validation (0: none)
    validation_prompts: list[str] = field(default_factory=list)  # drawn at each validation; []: diffusion's

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta: {self.beta} must be > 0")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout: {self.cond_dropout} must be in [0, 1]")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} must be >= 1 or null")
        if self.validation_pairs < 0:
            raise ValueError(f"validation_pairs: {self.validation_pairs} must be >= 0")
        if not self.cache:
            raise ValueError("cache: empty; give a folder for the encoded pairs")


# ----------------------------------------------------------------------------------------------------- loss


@dataclass
class DpoTerms:
    """Per-pair quantities of one Diffusion-DPO evaluation, all ``(B,)``."""

    loss: Tensor  # per-pair loss
    z: Tensor  # −β/2 · Δ: the implicit reward margin (winner minus loser)
    reward_w: Tensor  # −β/2 · (e_θ(x_w) − e_ref(x_w))
    reward_l: Tensor  # −β/2 · (e_θ(x_l) − e_ref(x_l))


def diffusion_dpo_terms(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float,
                        preference: Optional[Tensor] = None) -> DpoTerms:
    """Diffusion-DPO per pair (see the module docstring). ``preference`` is p, the probability that the first of
    the pair is preferred (1 when omitted; 0.5 for ties): loss ``−[p log σ(z) + (1 − p) log σ(−z)]``."""
    reward_w = -0.5 * beta * (err_w - ref_w)
    reward_l = -0.5 * beta * (err_l - ref_l)
    z = reward_w - reward_l
    loss = -F.logsigmoid(z)
    if preference is not None:
        p = preference.to(z)
        loss = -(p * F.logsigmoid(z) + (1.0 - p) * F.logsigmoid(-z))
    return DpoTerms(loss, z, reward_w, reward_l)


def dpo_statistics(terms: DpoTerms, preference: Optional[Tensor] = None) -> dict[str, float]:
    """Batch means to log: loss, implicit accuracy (over clear pairs), reward margin and the two rewards."""
    z = terms.z.detach().float()
    clear = torch.ones_like(z, dtype=torch.bool) if preference is None else preference.to(z.device) > 0.5
    n_clear = int(clear.sum())
    return {
        "implicit_acc": float(((z > 0) & clear).sum()) / n_clear if n_clear else 0.0,
        "reward_margin": float(z.mean()),
        "reward_w": float(terms.reward_w.detach().float().mean()),
        "reward_l": float(terms.reward_l.detach().float().mean()),
    }


# ------------------------------------------------------------------------------------------ the pair cache


def pair_cache_data_config(cache_dir: Path, prefix: str, base: DataConfig) -> DataConfig:
    """The loader config that streams cached pairs ``prefix`` (no images; latents, text, preference in json)."""
    return cache_data_config(cache_dir, prefix, base, PAIR_EXTRA_KEYS)


@torch.no_grad()
def cache_preference_pairs(
    data: DataConfig,
    prefix: str,
    out_dir: Path,
    autoencoder: Optional[nn.Module],
    text_encoder: nn.Module,
    ties: str,
    device: torch.device,
    dtype: str = "float32",
    batch_size: int = 64,
    max_samples_per_shard: int = 1000,
) -> tuple[int, SkipLog]:
    """Encode every usable pair of ``data`` into ``out_dir/<prefix>-*.tar`` (winner first); returns the number of
    pairs written and the skip log (bad pairs and dropped ties, by reason; also stored in the shard index).
    Without an autoencoder (pixel-space denoiser) the pixels themselves are stored. Image pairs and clip pairs
    alike (clips: ``(B, 3, T, H, W)`` in, ``(B, 2C, T, h, w)`` moments out)."""
    skips = SkipLog()
    np_dtype = np.float16 if dtype == "float16" else np.float32
    written = 0

    def encode(images: list[np.ndarray]) -> np.ndarray:
        pixels = normalize_pixels(to_uint8_pixels(np.stack(images)).to(device))  # (B, 3, [T,] H, W) in [-1, 1]
        if autoencoder is None:
            return pixels.cpu().numpy()
        return posterior_moments(autoencoder, pixels)  # (B, 2C, h, w)

    def flush(chunk: list) -> int:
        winners, losers = zip(*(p.ordered() for p in chunk))
        moments_w, moments_l = encode(list(winners)), encode(list(losers))
        cond = text_encoder.encode([p.caption for p in chunk])
        context = cond.context.float().cpu().numpy()  # (B, L, D)
        mask = cond.context_mask.cpu().numpy().astype(np.uint8)  # (B, L)
        pooled = cond.pooled.float().cpu().numpy() if cond.pooled is not None else np.zeros((len(chunk), 0))
        done = 0
        for i, p in enumerate(chunk):
            where = f"{printable(p.url)} {printable(p.key)}"
            problem = text_problem(p.caption)  # the pair reader skips these as bad_caption; a guard, never a crash
            if problem:
                skips.add("bad_caption", where)
                log.warning("dpo: skipped pair %s: bad_caption (caption %s)", where, problem)
                continue
            members = {
                "latent.npy": npy(moments_w[i].astype(np_dtype)),
                "latent_l.npy": npy(moments_l[i].astype(np_dtype)),
                "context.npy": npy(context[i].astype(np_dtype)),
                "context_mask.npy": npy(mask[i]),
                "pooled.npy": npy(pooled[i].astype(np_dtype)),
                "txt": p.caption.encode("utf-8"),
            }
            meta = {"preference": p.strength, "label_0": p.label_0, "source_key": printable(p.key),
                    "source_url": printable(p.url), "winner": 0 if p.winner_is_0 else 1}
            if p.image_0.ndim == 4:  # a clip pair: (T, H, W, 3) each
                meta["clip_frames"] = int(p.image_0.shape[0])
            try:
                writer.write_members(members, meta)
            except SkipSample as e:  # json that cannot be written: counted, nothing of it in the tar
                skips.add(e.reason, where)
                log.warning("dpo: skipped pair %s: %s (%s)", where, e.reason, e.detail)
                continue
            done += 1
        return done

    with ShardWriter(out_dir, prefix, WriterOptions(max_samples_per_shard, overwrite=True), skips) as writer:
        chunk: list = []
        for pair in iter_preference_pairs(data, ties, skips):  # type: ignore[arg-type]
            if chunk and pair.image_0.shape != chunk[0].image_0.shape:  # images and clips in one set: one per batch
                written += flush(chunk)
                chunk = []
            chunk.append(pair)
            if len(chunk) == batch_size:
                written += flush(chunk)
                chunk = []
        if chunk:
            written += flush(chunk)
    log.info("dpo: cached %d preference pairs of %r into %s (skipped %d: %s)", written, prefix, out_dir,
             skips.total, skips.format())
    return written, skips


# ---------------------------------------------------------------------------------------------------- stage


class DpoObjective(StagePart):
    """Diffusion-DPO (or the SFT baseline) as a stage's objective, on cached preference pairs.

    The reference is the policy with its adapters disabled when the stage has LoRA adapters, else (``policy:
    full``) a frozen copy of the base taken when the objective is bound, before any training.
    """

    autocast_eval = True  # the frozen reference (and a cast LoRA base) are held in the compute dtype

    def __init__(self, cfg: DpoStageConfig, val_pairs: Optional[list[Any]] = None):
        """``val_pairs`` are batches of cached held-out pairs."""
        self.cfg = cfg
        self.val_pairs = val_pairs or []
        self.reference: Optional[nn.Module] = None

    def bind(self, stage: DiffusionStage) -> None:
        super().bind(stage)
        if self.cfg.policy == "full" and self.cfg.objective == "dpo":
            self.reference = copy.deepcopy(stage.model).requires_grad_(False).eval()

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {} if self.reference is None else {"reference": self.reference}

    def export_metadata(self) -> dict[str, Any]:
        return {"objective": self.cfg.objective, "beta": self.cfg.beta}

    # ------------------------------------------------------------------------------------------- inputs

    def _sample(self, moments: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """A latent drawn from cached posterior moments (or the cached pixels of a pixel-space model)."""
        if self.stage.cfg.latents == "pixels":
            return moments.float()
        return self.stage.cached_latents(moments, generator)

    def pair_latents(self, batch: Any, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """(winner, loser) latents, shaped ``(B, C, h, w)`` (or ``(B, C, T, h, w)``) each."""
        if batch.latents is None or "latent_l" not in batch.extras:
            raise ValueError("dpo: the batch holds no cached pair latents (latent.npy / latent_l.npy)")
        return self._sample(batch.latents, generator), self._sample(batch.extras["latent_l"], generator)

    def pair_conditioning(self, batch: Any) -> Conditioning:
        ex, device = batch.extras, self.stage.device
        pooled = ex.get("pooled")
        return Conditioning(context=ex["context"].float().to(device),
                            context_mask=ex["context_mask"].bool().to(device),
                            pooled=pooled.float().to(device) if pooled is not None and pooled.shape[-1] else None)

    def preference_of(self, batch: Any) -> Tensor:
        return torch.tensor([float(m.get("preference", 1.0)) for m in batch.metadata], device=self.stage.device)

    # ---------------------------------------------------------------------------------------------- loss

    def reference_output(self, model: nn.Module, x_t: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        """ε_ref's output: the policy with its adapter disabled (LoRA), or the frozen copy (full)."""
        with torch.no_grad():
            if self.reference is None:
                with adapters_disabled(model) as base:
                    return base(x_t, timesteps, cond)
            with self.stage.autocast(x_t.device):
                return self.reference(x_t, timesteps, cond).float()

    def errors(self, out: Tensor, terms: Any) -> Tensor:
        """Per-sample errors ``(N,)``: ε-space element-mean squared error, or the process's weighted loss."""
        process = self.stage.process
        if self.cfg.error == "target":
            return process.loss(out, terms, reduction="none")
        eps = process.to_eps(out.float(), terms.x_t.float(), terms.t)
        return (eps - terms.noise.float()).square().flatten(1).mean(1)

    def dpo_step(self, model: nn.Module, xw: Tensor, xl: Tensor, cond: Conditioning, preference: Tensor,
                 generator: Optional[torch.Generator] = None) -> tuple[DpoTerms, dict[str, float]]:
        """One Diffusion-DPO evaluation: shared noise and timestep per pair, policy and reference errors."""
        process = self.stage.process
        b = xw.shape[0]
        noise = process.sample_noise(xw, generator)  # shaped like xw, shared by winner and loser
        draw_on = xw.device if generator is None else torch.device("cpu")
        t = process.for_shape(xw.shape).sample_timesteps(b, generator, draw_on)  # token-shifted times, if configured
        t = t.to(xw.device)
        terms = process.training_loss_terms(torch.cat([xw, xl]), noise=torch.cat([noise, noise]),
                                            t=torch.cat([t, t]))
        cond2 = cat_conditioning(cond, cond)
        ref = self.reference_output(model, terms.x_t, terms.timesteps, cond2)
        out = model(terms.x_t, terms.timesteps, cond2)  # (2B, ...) like x_t
        err_w, err_l = self.errors(out, terms).chunk(2)
        ref_w, ref_l = self.errors(ref, terms).detach().chunk(2)
        dpo = diffusion_dpo_terms(err_w, err_l, ref_w, ref_l, self.cfg.beta, preference)
        logs = dpo_statistics(dpo, preference)
        logs["model_mse"] = float(0.5 * (err_w.detach().mean() + err_l.detach().mean()))
        logs["ref_mse"] = float(0.5 * (ref_w.mean() + ref_l.mean()))
        return dpo, logs

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        stage = self.stage
        xw, xl = self.pair_latents(batch)
        cond, null = trim_together(self.pair_conditioning(batch), stage.null_conditioning(1))
        cond, dropped = drop_conditioning(cond, null, self.cfg.cond_dropout)  # the text group, winner and loser
        if self.cfg.objective == "sft":
            terms = stage.process.training_loss_terms(xw)
            loss = stage.process.loss(model(terms.x_t, terms.timesteps, cond), terms)
            return loss, {"dropped_fraction": float(dropped.float().mean())}
        preference = self.preference_of(batch)
        dpo, logs = self.dpo_step(model, xw, xl, cond, preference)
        logs["dropped_fraction"] = float(dropped.float().mean())
        return dpo.loss.mean(), logs

    # ---------------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def validation_scores(self, model: nn.Module) -> dict[str, float]:
        """DPO loss, implicit accuracy and reward margin on the held-out pairs at fixed noise and timesteps."""
        if not self.val_pairs or not self.cfg.validation_pairs:
            return {}
        g = torch.Generator().manual_seed(1234)
        sums: dict[str, float] = {}
        n = 0
        for batch in self.val_pairs:
            if n >= self.cfg.validation_pairs:
                break
            batch = batch.to(self.stage.device)
            xw, xl = self.pair_latents(batch, g)
            cond = self.pair_conditioning(batch).trim_context()
            preference = self.preference_of(batch)
            dpo, logs = self.dpo_step(model, xw, xl, cond, preference, generator=g)
            logs["dpo_loss"] = float(dpo.loss.mean())
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch)
            n += len(batch)
        return {k: v / n for k, v in sums.items()}

    def validation_metrics(self, model: nn.Module) -> dict[str, float]:
        return self.validation_scores(model)


def make_dpo_stage(cfg: DiffusionStageConfig, dpo: DpoStageConfig, text_encoder: nn.Module,
                   autoencoder: Optional[nn.Module], image_size: tuple[int, int],
                   val_pairs: Optional[list[Any]] = None) -> DiffusionStage:
    """The ``dpo`` stage: :class:`DpoObjective` on the denoiser ``cfg`` describes (``cfg.weights`` are the base
    weights), with LoRA adapters as the policy (``policy: lora``) or every weight trained (``policy: full``)."""
    if not cfg.weights:
        raise ValueError("dpo: needs base denoiser weights (diffusion.weights, or a diffusion stage before it)")
    if cfg.micro_conditioning != "none":
        raise ValueError("diffusion.micro_conditioning: the dpo stage does not cache the pairs' size/crop "
                         "conditioning yet; set it to false")
    adapters = LoraAdapters(dpo.adapter, cast_base=dpo.cast_base) if dpo.policy == "lora" else None
    return DiffusionStage(cfg, text_encoder, autoencoder, image_size, [], name="dpo",
                          objective=DpoObjective(dpo, val_pairs), adapters=adapters)


__all__ = ["DpoObjective", "DpoStageConfig", "DpoTerms", "cache_preference_pairs", "diffusion_dpo_terms",
           "dpo_statistics", "make_dpo_stage", "pair_cache_data_config"]
