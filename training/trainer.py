"""The training loop, on Hugging Face Accelerate.

The only place that touches Accelerate's ``prepare``, ``accumulate``, ``backward`` and ``save_state``. What differs
between stages (what trains, the loss, validation, export) lives in :mod:`training.stages`; the distribution
strategy (DDP, DeepSpeed ZeRO, FSDP) comes from the Accelerate launch configuration, not from here.

One step: ``grad_accum`` micro-batches → loss → (finite on every rank?) → backward → clip → optimizer and LR
scheduler step → EMA update → logs; checkpoints, validation and export at their intervals.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

from training.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from training.ema import EMA
from training.stages.base import Stage

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then a constant, cosine or linear learning rate."""

    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decays
    eps: float = 1e-8  # Adam epsilon
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up
    min_lr_ratio: float = 0.0  # floor of the cosine/linear decay, as a fraction of lr
    max_grad_norm: Optional[float] = 1.0  # clip the global gradient norm; null: no clipping

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: {self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: {self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: {self.min_lr_ratio} must be in [0, 1]")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm: {self.max_grad_norm} must be > 0 or null")


@dataclass
class TrainConfig:
    """How long and how to train a stage."""

    max_steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch × grad_accum × world size)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16 on a CUDA GPU that has it, else fp32
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and LR schedule
    ema_decay: Optional[float] = 0.9999  # EMA of the trained weights; null: no EMA
    ema_warmup: bool = True  # ramp the EMA decay as min(decay, (1+n)/(10+n))
    max_nonfinite_steps: int = 10  # stop after this many non-finite losses in a row (each one is skipped)
    log_every: int = 10  # steps between log lines / TensorBoard points
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # keep the last N checkpoints
    validate_every: int = 0  # steps between validations; 0: only at the end
    resume: str = "auto"  # auto (latest if any), latest (must exist), none, or a checkpoint folder
    cpu: bool = False  # force the CPU even where a GPU is present
    progress: bool = True  # console progress bar

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum", "log_every", "checkpoint_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 1")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints: {self.keep_checkpoints} must be >= 1")
        if self.validate_every < 0:
            raise ValueError(f"validate_every: {self.validate_every} must be >= 0")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: {self.ema_decay} must be in [0, 1) or null")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """The LR multiplier as a function of the optimizer step."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def resolve_mixed_precision(choice: str, cpu: bool) -> str:
    if choice != "auto":
        return choice
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


class _StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM pre-emption): the loop checkpoints and returns at the end of the step."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class TrainResult:
    step: int
    stopped_by_signal: Optional[int] = None
    metrics: dict[str, float] = field(default_factory=dict)
    export_path: Optional[Path] = None


class Trainer:
    """Trains one :class:`Stage` on a data loader.

    ``loader`` is an iterable of batches with ``state_dict()`` / ``load_state_dict()`` (its position, saved in every
    checkpoint) and optionally ``stats()`` (bad-sample counts, logged). Each ``iter(loader)`` is one epoch.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        stage: Stage,
        loader: Any,
        run_dir: str | Path,
        seed: int = 0,
        config_yaml: Optional[str] = None,
        accelerator: Any = None,
    ):
        self.cfg, self.stage, self.loader = cfg, stage, loader
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.config_yaml = config_yaml
        if accelerator is None:
            from accelerate import Accelerator
            from accelerate.utils import ProjectConfiguration

            mp = resolve_mixed_precision(cfg.mixed_precision, cfg.cpu)
            accelerator = Accelerator(
                cpu=cfg.cpu,
                mixed_precision=mp,
                gradient_accumulation_steps=cfg.grad_accum,
                log_with="tensorboard",
                project_config=ProjectConfiguration(
                    project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")
                ),
            )
        self.accelerator = accelerator

    # ---------------------------------------------------------------------------------------------- helpers

    def _weight_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision, torch.float32)

    def _any_rank_true(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def _mean_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], device=self.accelerator.device, dtype=torch.float64)
        t = self.accelerator.reduce(t, reduction="mean")
        return dict(zip(keys, t.tolist()))

    def eval_model(self, model: nn.Module, ema: Optional[EMA]) -> nn.Module:
        """A copy of the trained module carrying the EMA weights (or the live weights without EMA), in eval mode."""
        unwrapped = self.accelerator.unwrap_model(model)
        eval_model = copy.deepcopy(unwrapped)
        if ema is not None:
            ema.copy_to(eval_model)
        return eval_model.eval()

    # -------------------------------------------------------------------------------------------------- fit

    def fit(self) -> TrainResult:
        cfg, acc, stage = self.cfg, self.accelerator, self.stage
        from accelerate.utils import set_seed

        set_seed(self.seed, device_specific=True)
        model = stage.trainable()
        params = list(stage.parameters_to_optimize(model))
        if not params:
            raise ValueError(f"stage {stage.name!r}: nothing to train (no parameter requires grad)")
        opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                weight_decay=cfg.optim.weight_decay)
        lr_at = lr_lambda(cfg.optim, cfg.max_steps)  # the LR is a function of the step: nothing to checkpoint
        model, opt = acc.prepare(model, opt)
        stage.setup(acc.device, self._weight_dtype())

        ema = None
        if cfg.ema_decay is not None:
            ema = EMA(acc.unwrap_model(model).named_parameters(), cfg.ema_decay, cfg.ema_warmup).to(acc.device)

        step, nonfinite_total = 0, 0
        resume_from = resolve_resume(cfg.resume, self.run_dir)
        if resume_from is not None:
            restored = load_checkpoint(acc, resume_from)
            step = int(restored["trainer"]["step"])
            nonfinite_total = int(restored["trainer"].get("nonfinite_total", 0))
            if restored["loader"] is not None and hasattr(self.loader, "load_state_dict"):
                self.loader.load_state_dict(restored["loader"])
            if ema is not None and restored["ema"] is not None:
                ema.load_state_dict(restored["ema"])
            log.info("resumed from %s at step %d", resume_from, step)

        if acc.is_main_process:
            acc.init_trackers(stage.name)
        world = acc.num_processes
        log.info("stage %s: %d trainable parameters; global batch = micro-batch × %d accumulation × %d processes",
                 stage.name, sum(p.numel() for p in params), cfg.grad_accum, world)

        def save(step_: int) -> None:
            save_checkpoint(
                acc, self.run_dir, step_,
                {"nonfinite_total": nonfinite_total, "stage": stage.name},
                self.loader.state_dict() if hasattr(self.loader, "state_dict") else None,
                ema.state_dict() if ema is not None else None,
                self.config_yaml, cfg.keep_checkpoints,
            )

        result = TrainResult(step=step)
        pbar = None
        if cfg.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            pbar = tqdm(total=cfg.max_steps, initial=step, desc=stage.name, dynamic_ncols=True)
        batches = iter(self.loader)

        def next_batch() -> Any:
            nonlocal batches
            try:
                return next(batches)
            except StopIteration:
                batches = iter(self.loader)  # next epoch
                try:
                    return next(batches)
                except StopIteration:
                    raise RuntimeError(
                        f"stage {stage.name!r}: the data loader yielded no batch in a whole epoch"
                    ) from None

        consecutive_bad = 0
        window: dict[str, float] = {}
        window_steps, window_samples, window_data_time = 0, 0, 0.0
        window_start = time.perf_counter()
        model.train()
        with _StopFlag() as stop:
            while step < cfg.max_steps:
                bad = False
                sums: dict[str, float] = {}
                lr = cfg.optim.lr * lr_at(step)
                for group in opt.param_groups:
                    group["lr"] = lr
                for _ in range(cfg.grad_accum):
                    t0 = time.perf_counter()
                    batch = next_batch()
                    window_data_time += time.perf_counter() - t0
                    if hasattr(batch, "to"):
                        batch = batch.to(acc.device)
                    window_samples += len(batch) if hasattr(batch, "__len__") else 0
                    with acc.accumulate(model):
                        loss, logs = stage.loss(model, batch)
                        if self._any_rank_true(not bool(torch.isfinite(loss.detach()).all())):
                            bad = True  # every rank skips backward together: no collective is left waiting
                        if not bad:
                            acc.backward(loss)
                            if acc.sync_gradients and cfg.optim.max_grad_norm is not None:
                                grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                                if grad_norm is not None:
                                    logs["grad_norm"] = float(grad_norm)
                            opt.step()  # Accelerate makes this a no-op until the last micro-batch
                        opt.zero_grad(set_to_none=True)
                    for k, v in {"loss": float(loss.detach()), **logs}.items():
                        sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
                step += 1
                if bad:
                    nonfinite_total += 1
                    consecutive_bad += 1
                    log.warning("step %d: non-finite loss on some rank; step skipped (%d in a row, %d in all)",
                                step, consecutive_bad, nonfinite_total)
                    if consecutive_bad >= cfg.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{consecutive_bad} non-finite losses in a row (limit train.max_nonfinite_steps="
                            f"{cfg.max_nonfinite_steps}); the last checkpoint is intact under {self.run_dir}. "
                            "Lower the learning rate, check the data, or use bf16 instead of fp16."
                        )
                else:
                    consecutive_bad = 0
                    if ema is not None:
                        ema.update(acc.unwrap_model(model).named_parameters())
                    for k, v in sums.items():
                        window[k] = window.get(k, 0.0) + v
                    window_steps += 1

                if pbar is not None:
                    pbar.update(1)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    scalars = {k: v / max(window_steps, 1) for k, v in window.items()}
                    scalars = self._mean_across_ranks(scalars)
                    scalars.update({
                        "lr": lr,
                        "samples_per_s": window_samples * world / elapsed,
                        "data_wait_fraction": window_data_time / elapsed,
                        "nonfinite_steps": float(nonfinite_total),
                    })
                    stats = self.loader.stats() if hasattr(self.loader, "stats") else {}
                    for reason, n in (stats.get("skipped") or {}).items():
                        scalars[f"data/skipped_{reason}"] = float(n)
                    acc.log(scalars, step=step)
                    result.metrics.update(scalars)
                    if pbar is not None:
                        pbar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", lr=f"{scalars['lr']:.2e}",
                                         sps=f"{scalars['samples_per_s']:.0f}",
                                         wait=f"{scalars['data_wait_fraction']:.0%}")
                    window, window_steps, window_samples, window_data_time = {}, 0, 0, 0.0
                    window_start = time.perf_counter()

                stopping = self._any_rank_true(stop.signal is not None)
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stopping:
                    save(step)
                if (cfg.validate_every and step % cfg.validate_every == 0 and step != cfg.max_steps) and not stopping:
                    self._validate(model, ema, step, result)
                if stopping:
                    log.warning("received signal %s: checkpoint saved at step %d, exiting", stop.signal, step)
                    result.stopped_by_signal = stop.signal or -1
                    break
        if pbar is not None:
            pbar.close()
        result.step = step
        if result.stopped_by_signal is None:
            self._validate(model, ema, step, result)
            if acc.is_main_process:
                result.export_path = stage.export(self.eval_model(model, ema), self.run_dir / "export")
                if result.export_path is not None and self.config_yaml is not None:
                    (self.run_dir / "export" / "run_config.yaml").write_text(self.config_yaml)
        acc.wait_for_everyone()
        acc.end_training()
        return result

    def _validate(self, model: nn.Module, ema: Optional[EMA], step: int, result: TrainResult) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            with torch.no_grad():
                metrics = self.stage.validate(self.eval_model(model, ema), step, self.run_dir / "validation")
            if metrics:
                acc.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
                result.metrics.update({f"val/{k}": v for k, v in metrics.items()})
                log.info("step %d validation: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        acc.wait_for_everyone()
        model.train()
