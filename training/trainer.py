"""The training loop, on Hugging Face Accelerate.

The only place that touches Accelerate's ``prepare``, ``accumulate``, ``backward`` and ``save_state``. What differs
between stages (what trains, the loss, validation, export) lives in :mod:`training.stages`; the distribution
strategy (DDP, DeepSpeed ZeRO, FSDP) comes from the Accelerate launch configuration, not from here.

One step: ``grad_accum`` micro-batches → loss → backward → (finite on every rank?) → clip → optimizer and LR
scheduler step → EMA update → logs; checkpoints, validation and export at their intervals.

No Python decision waits for the device inside a step (each would be a host–device synchronisation that leaves the
GPU idle while the host catches up): whether the loss was finite is a 0-dim bool tensor, agreed between ranks by an
all-reduce of that tensor, and it skips the update on the device — the fused AdamW kernel's ``found_inf`` argument
(the mechanism of ``torch.amp.GradScaler``: parameters, moments and step count untouched) and an EMA weight of 0.
The loss, the stage's logs and the gradient norm stay on the device (float64, the same arithmetic as the host's
floats) and are read together, once, when the window is logged (every ``log_every`` steps) or checkpointed; the
skipped steps are counted and warned about then, and the stop after ``max_nonfinite_steps`` in a row is raised then
(so up to ``log_every − 1`` further steps, each skipped, may run first). Where the optimizer cannot take the flag
(a non-fused optimizer, fp16's GradScaler) the step reads it once, after the backward passes.

The same loop runs single-process, under DDP, DeepSpeed ZeRO-1/2/3 and FSDP2 (:mod:`training.sharding` holds what
differs). Under DeepSpeed:

* the JSON's ``auto`` values are filled from the run config before ``prepare`` (``Trainer(micro_batch_size=...)``,
  ``grad_accum``, ``max_grad_norm``), so global batch = micro-batch × accumulation × world size as under DDP;
* DeepSpeed divides the loss by its accumulation steps, clips, steps and zeroes the gradients inside
  ``accelerator.backward`` at the accumulation boundary (``opt.step``/``zero_grad`` are no-ops there); the learning
  rate written into ``opt.param_groups`` reaches the wrapped torch optimizer's groups;
* a non-finite step cannot simply skip ``backward`` (DeepSpeed's accumulation buffers would keep the step's earlier
  micro-batches and leak them into the next step): the step's remaining micro-batches back-propagate a NaN instead,
  DeepSpeed's overflow check then drops the whole update and clears the buffers — the same skipped step as DDP's;
* with bf16/fp16 the trained module's own forward opens ``torch.autocast`` and returns fp32 (DeepSpeed casts the
  weights, not the inputs, and switches off an autocast opened around its engine).

Under ZeRO-3 and FSDP2 the EMA averages each rank's own shard; validation and export use an evaluation copy built on
the main process from the consolidated weights (``accelerator.get_state_dict`` + the gathered EMA) into a meta-device
skeleton of the model taken before ``prepare``. Frozen modules (text encoder, autoencoder) are never prepared; the
trainer checks that no engine partitioned them.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import torch
from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.protocol import TrainLoader, check_loader
from training.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from training.ema import EMA
from training.sequence_parallel import attach_sequence_parallel, data_parallel_position
from training.sharding import (
    autocast_forward,
    check_strategy_honoured,
    deepspeed_autocast_dtype,
    deepspeed_plugin,
    frozen_sharded_parameters,
    innermost_optimizer,
    materialize,
    meta_skeleton,
    prepare_deepspeed_config,
    prepare_fsdp2_wrapping,
    strategy_name,
)
from training.speedups import apply_activation_checkpointing, apply_channels_last, compile_blocks
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
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"  # AdamW kernel: auto = fused (one
    # kernel over all parameters, on CUDA and CPU; skips a non-finite step on the device; also inside DeepSpeed's
    # ZeRO optimizer, so that ZeRO and a single process step alike) except under FSDP (foreach, over DTensors)

    def __post_init__(self) -> None:
        if self.implementation not in ("auto", "fused", "foreach", "for_loop"):
            raise ValueError(f"implementation: {self.implementation!r} must be auto, fused, foreach or for_loop")
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
    collective_timeout_s: Optional[float] = None  # seconds a collective waits on a stuck rank; null: NCCL 10m, gloo 30m
    data_timeout_s: Optional[float] = None  # seconds a rank waits for one batch before failing under its own name;
    # null: 0.75 × collective_timeout_s when several ranks run (so the stalled rank is reported, not a peer's timeout)
    progress: bool = True  # console progress bar
    compile: Literal["none", "blocks"] = "none"  # blocks: torch.compile each repeated block (regional compilation)
    activation_checkpointing: Literal["none", "blocks", "selective"] = "none"  # recompute in backward: blocks = each
    # repeated block whole; selective = keep the matmul/attention outputs, recompute the cheap ops (norms, activations)
    channels_last: bool = False  # convolution weights (and so activations) in channels-last layout (U-Net on GPU)

    def __post_init__(self) -> None:
        if self.compile not in ("none", "blocks"):
            raise ValueError(f"compile: {self.compile!r} must be none or blocks")
        if self.activation_checkpointing not in ("none", "blocks", "selective"):
            raise ValueError(f"activation_checkpointing: {self.activation_checkpointing!r} must be none, blocks or "
                             "selective")
        for name in ("max_steps", "grad_accum", "log_every", "checkpoint_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 1")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints: {self.keep_checkpoints} must be >= 1")
        if self.validate_every < 0:
            raise ValueError(f"validate_every: {self.validate_every} must be >= 0")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: {self.ema_decay} must be in [0, 1) or null")
        if self.collective_timeout_s is not None and self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s: {self.collective_timeout_s} must be > 0 (seconds) or null")
        if self.data_timeout_s is not None and self.data_timeout_s <= 0:
            raise ValueError(f"data_timeout_s: {self.data_timeout_s} must be > 0 (seconds) or null")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


class DataStallError(RuntimeError):
    """A rank waited longer than ``train.data_timeout_s`` for one batch from its loader."""


@contextmanager
def _deadline(seconds: Optional[float], message: Callable[[], str]) -> Iterator[None]:
    """Raise :class:`DataStallError` (``message()``) if the block runs longer than ``seconds``.

    A real-time interval timer (``setitimer``) delivers SIGALRM, which also interrupts a blocking read or a
    DataLoader queue wait; the handler raises. A no-op without a limit, off the main thread (signals reach only it)
    or where ``setitimer`` does not exist.
    """
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise DataStallError(message())

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _as_log_value(v: Any) -> Any:
    """A log value kept where it is: a tensor detached as a float64 scalar on its device (the host's float
    arithmetic, without the synchronisation of ``float(t)``), anything else as a Python float."""
    if isinstance(v, torch.Tensor):
        return v.detach().reshape(()).to(torch.float64)
    return float(v)


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


def adamw_kernel(implementation: str, strategy: str) -> dict[str, bool]:
    """``torch.optim.AdamW``'s ``fused``/``foreach`` keywords for ``optim.implementation`` under ``strategy``
    (see :func:`training.sharding.strategy_name`)."""
    if implementation == "auto":
        implementation = "foreach" if strategy.startswith("fsdp") else "fused"
    return {"fused": {"fused": True}, "foreach": {"foreach": True},
            "for_loop": {"foreach": False, "fused": False}}[implementation]


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


def _process_group_kwargs(timeout_s: Optional[float]) -> list[Any]:
    """Accelerate's handler that sets the collective timeout when the Accelerator creates the process group."""
    if timeout_s is None:
        return []
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]


def _apply_collective_timeout(timeout_s: Optional[float]) -> None:
    """Set the timeout on a process group that already existed (created by an earlier stage or by the pipeline's
    ``PartialState()``): Accelerate ignores ``InitProcessGroupKwargs`` then, so without this the backend default
    would hold and a stuck rank would hang the others for up to 30 minutes."""
    import torch.distributed as dist

    if timeout_s is None or not (dist.is_available() and dist.is_initialized()):
        return
    from datetime import timedelta

    set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # torch < 2.7
    set_timeout(timedelta(seconds=timeout_s))


@dataclass
class TrainResult:
    step: int
    stopped_by_signal: Optional[int] = None
    metrics: dict[str, float] = field(default_factory=dict)
    export_path: Optional[Path] = None


@dataclass
class StepLogs:
    """What one :meth:`Trainer.train_step` reports, still on the device (read with the window, not every step)."""

    values: dict[str, Any]  # loss and the stage's logs (means over the micro-batches), grad_norm: 0-dim tensors
    # (float64) or floats
    skipped: Any  # whether the update was skipped (non-finite loss on some rank): a 0-dim bool tensor or a bool


@dataclass
class LogWindow:
    """Sums over the steps since the last log line (its values are averaged over ``steps`` when logged)."""

    sums: dict[str, float] = field(default_factory=dict)  # per-step logs of the finite steps, summed (read ones)
    steps: int = 0  # finite steps in the window (read ones)
    pending: list[tuple[int, StepLogs]] = field(default_factory=list)  # (step, logs) not yet read from the device
    samples: int = 0  # samples this rank trained on (non-finite steps included)
    data_time: float = 0.0  # seconds spent waiting for the loader
    start: float = field(default_factory=time.perf_counter)  # when the window opened


@dataclass
class TrainState:
    """What :meth:`Trainer.fit` carries from step to step; built by :meth:`Trainer._setup`."""

    model: nn.Module  # the trained module as prepared by Accelerate (wrapped / sharded)
    opt: Any  # the prepared optimizer
    ema: Optional[EMA]  # the EMA of the trained parameters; None: train.ema_decay is null
    lr_at: Callable[[int], float]  # the LR multiplier of a step (see lr_lambda)
    use_deepspeed: bool  # under DeepSpeed a skipped step back-propagates a NaN (see the module docstring)
    result: TrainResult  # what fit() returns, filled as the run goes
    skip_on_device: bool = False  # the optimizer takes the non-finite flag as a tensor (fused AdamW's found_inf)
    step: int = 0  # optimizer steps done (skipped ones included)
    lr: float = 0.0  # the learning rate of the last step
    nonfinite_total: int = 0  # skipped steps over the whole run (checkpointed)
    consecutive_bad: int = 0  # skipped steps in a row
    batches: Optional[Iterator[Any]] = None  # the current epoch of the loader
    window: LogWindow = field(default_factory=LogWindow)  # the logging window
    pbar: Any = None  # the progress bar (main process, train.progress)


class Trainer:
    """Trains one :class:`Stage` on a data loader.

    ``loader`` is a :class:`data_pipeline.protocol.TrainLoader`: an iterable of batches (each ``iter(loader)`` is
    one epoch) with ``state_dict()`` / ``load_state_dict()`` (its position, saved in every checkpoint) and
    ``stats()`` (bad-sample counts, logged). ``micro_batch_size`` is the per-rank batch the loader yields; DeepSpeed
    needs it, and the start-up log states the global batch.

    :meth:`fit` is set-up (:meth:`_setup`), then :meth:`train_step` and the interval work (:meth:`_end_of_step`:
    logs, checkpoints, validation, signals) until ``max_steps``, then the last validation and the export. A subclass
    may override :meth:`train_step`.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        stage: Stage,
        loader: TrainLoader,
        run_dir: str | Path,
        *,
        micro_batch_size: int,
        seed: int = 0,
        config_yaml: Optional[str] = None,
        accelerator: Any = None,
        sequence_parallel: int = 1,
    ):
        check_loader(loader)
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"Trainer: micro_batch_size={micro_batch_size!r} must be an int >= 1 (the per-rank "
                             "batch the loader yields)")
        self.cfg, self.stage, self.loader = cfg, stage, loader
        self.micro_batch_size = micro_batch_size
        self._skeleton: Optional[nn.Module] = None
        self.state: Optional[TrainState] = None  # the last fit()'s state, for inspection
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
                kwargs_handlers=_process_group_kwargs(cfg.collective_timeout_s),
            )
            _apply_collective_timeout(cfg.collective_timeout_s)
        self.accelerator = accelerator
        self.data_timeout_s = cfg.data_timeout_s  # the longest wait for one batch (see TrainConfig.data_timeout_s)
        # ranks sharing each sample (parallel.sequence_parallel, training.sequence_parallel); the loader must give
        # every rank of a group the same batches (build it for data_parallel_position)
        self.sequence_parallel = sequence_parallel
        self.data_parallel_size = data_parallel_position(accelerator.process_index, accelerator.num_processes,
                                                         sequence_parallel)[1]
        if self.data_timeout_s is None and cfg.collective_timeout_s is not None and accelerator.num_processes > 1:
            self.data_timeout_s = 0.75 * cfg.collective_timeout_s

    # ---------------------------------------------------------------------------------------------- helpers

    def _weight_dtype(self) -> torch.dtype:
        """The dtype of the frozen modules: the training precision (under DeepSpeed, its bf16/fp16 section)."""
        ds_dtype = deepspeed_autocast_dtype(self.accelerator)
        if ds_dtype is not None:
            return ds_dtype
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision, torch.float32)

    def _check_accumulation(self) -> None:
        acc_steps = self.accelerator.gradient_accumulation_steps
        if acc_steps != self.cfg.grad_accum:
            raise ValueError(
                f"grad_accum: the launcher set gradient accumulation to {acc_steps} (accelerate launch "
                f"--gradient_accumulation_steps / ACCELERATE_GRADIENT_ACCUMULATION_STEPS or the DeepSpeed JSON) but "
                f"train.grad_accum is {self.cfg.grad_accum}: set it in the run config only"
            )

    def _any_rank(self, flag: torch.Tensor) -> torch.Tensor:
        """``flag`` (a 0-dim bool tensor) OR-ed over the ranks, without reading it on the host."""
        if self.accelerator.num_processes == 1:
            return flag
        return self.accelerator.reduce(flag.to(torch.float32).reshape(1), reduction="sum").reshape(()) > 0

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

    def consolidated_weights(self, model: nn.Module, ema: Optional[EMA]) -> Optional[dict[str, torch.Tensor]]:
        """The trained module's state dict with whole tensors, on the main process (None on the others).

        The live weights come from ``accelerator.get_state_dict`` (which gathers ZeRO-3 partitions and FSDP shards);
        the EMA's averages, gathered from every rank's shards, replace the trained parameters. Collective: every rank
        must call it.
        """
        acc = self.accelerator
        state: Optional[dict[str, torch.Tensor]] = None
        if strategy_name(acc) in ("zero3", "fsdp1", "fsdp2"):
            state = acc.get_state_dict(model)  # collective
        elif acc.is_main_process:  # whole weights already here: references, copied once by the evaluation copy
            state = acc.unwrap_model(model).state_dict()
        averaged = None
        if ema is not None:
            averaged = ema.full_weights(dst=0)
        if not acc.is_main_process:
            return None
        state = {k: v.detach() for k, v in state.items()}
        if averaged is not None:
            unknown = set(averaged) - set(state)
            if unknown:
                raise KeyError(f"EMA weights missing from the model's state dict: {sorted(unknown)[:5]}")
            state.update(averaged)
        return state

    def eval_model(self, model: nn.Module, ema: Optional[EMA]) -> Optional[nn.Module]:
        """A copy of the trained module carrying the EMA weights (or the live weights without EMA), in eval mode, on
        the main process; None on the other ranks. Collective (see :meth:`consolidated_weights`)."""
        if self._skeleton is None:  # called before fit(): the module must not be sharded yet
            self._skeleton = meta_skeleton(self.accelerator.unwrap_model(model))
        state = self.consolidated_weights(model, ema)
        if state is None:
            return None
        return materialize(self._skeleton, state, self.accelerator.device)

    # -------------------------------------------------------------------------------------------------- fit

    def fit(self) -> TrainResult:
        """Train until ``train.max_steps`` (or a SIGTERM/SIGUSR1: checkpoint and return), then the last validation
        and the export, on one evaluation copy."""
        state = self.state = self._setup()
        with _StopFlag() as stop:
            while state.step < self.cfg.max_steps:
                logs = self.train_step(state)
                if self._end_of_step(state, logs, stop):
                    break
        return self._finish(state)

    def train_step(self, state: TrainState) -> StepLogs:
        """One optimizer step over ``train.grad_accum`` micro-batches: loss → backward → clip → step → EMA.

        Returns the step's logs on the device (:class:`StepLogs`: ``loss`` and the stage's values averaged over the
        micro-batches, ``grad_norm`` where clipped) and whether the update was skipped because the loss was not
        finite on some rank — then every rank skips it: the optimizer and the EMA leave every value untouched
        (under DeepSpeed the step's remaining micro-batches back-propagate a NaN, so that its overflow check drops the
        step and clears its accumulation buffers). Nothing here waits for the device (see the module docstring).
        """
        cfg, acc, model, opt = self.cfg, self.accelerator, state.model, state.opt
        state.lr = cfg.optim.lr * state.lr_at(state.step)
        for group in opt.param_groups:
            group["lr"] = state.lr
        bad: Optional[torch.Tensor] = None  # 0-dim bool: a micro-batch's loss was not finite (on some rank)
        skipped: Any = False  # the decision, agreed by every rank: a 0-dim bool tensor, or a bool read on the host
        sums: dict[str, Any] = {}
        for _ in range(cfg.grad_accum):
            batch = self._next_batch(state)
            with acc.accumulate(model):
                loss, logs = self.stage.loss(model, batch)
                nonfinite = ~torch.isfinite(loss.detach()).all()
                bad = nonfinite if bad is None else bad | nonfinite
                if state.use_deepspeed:  # every rank back-propagates a NaN from the first bad micro-batch on
                    bad = self._any_rank(bad)
                    nan_or_one = torch.where(bad, torch.full_like(loss.detach(), float("nan")),
                                             torch.ones_like(loss.detach()))
                    acc.backward(loss * nan_or_one)
                else:
                    acc.backward(loss)  # a non-finite loss still back-propagates: the update is skipped below
                if acc.sync_gradients:
                    grad_norm, skipped = self._optimizer_step(state, bad)
                    if grad_norm is not None:
                        sums["grad_norm"] = _as_log_value(grad_norm)
                opt.zero_grad(set_to_none=True)
            for k, v in {"loss": loss, **logs}.items():
                if k != "grad_norm":
                    sums[k] = sums.get(k, 0.0) + _as_log_value(v) / cfg.grad_accum
        state.step += 1
        if state.ema is not None:
            if isinstance(skipped, torch.Tensor):
                state.ema.update(skip=skipped)
            elif not skipped:
                state.ema.update()
        return StepLogs(values=sums, skipped=skipped)

    def _optimizer_step(self, state: TrainState, bad: torch.Tensor) -> tuple[Any, Any]:
        """At the last micro-batch: agree on ``bad`` across ranks, clip, and step unless ``bad`` — on the device
        (fused AdamW's ``found_inf``) where the optimizer can, else after reading the flag once. Returns the gradient
        norm (a tensor, or what DeepSpeed reports; None without clipping) and the agreed skip flag (a 0-dim bool
        tensor, or a bool where it was read on the host)."""
        cfg, acc, model, opt = self.cfg, self.accelerator, state.model, state.opt
        if state.use_deepspeed:  # DeepSpeed clipped and stepped inside backward (its overflow check skips); `bad`
            # was agreed micro-batch by micro-batch
            norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm) \
                if cfg.optim.max_grad_norm is not None else None
            return norm, bad
        bad = self._any_rank(bad)
        if not state.skip_on_device:
            if bool(bad):  # the one synchronisation of this path
                return None, True
        grad_norm = None
        if cfg.optim.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        if state.skip_on_device:
            inner = innermost_optimizer(opt)
            inner.grad_scale, inner.found_inf = None, bad.to(torch.float32)
            try:
                opt.step()
            finally:
                del inner.grad_scale, inner.found_inf
            return grad_norm, bad
        opt.step()
        return grad_norm, False

    # ---------------------------------------------------------------------------------------------- set-up

    def _setup(self) -> TrainState:
        """Seed, optimizer, ``prepare`` (DeepSpeed's config filled first), frozen modules, EMA, resume, trackers,
        progress bar; the loader's first epoch."""
        from accelerate.utils import set_seed

        set_seed(self.seed + self.accelerator.process_index // self.sequence_parallel)  # by data-parallel rank
        acc, cfg = self.accelerator, self.cfg
        model, opt, use_deepspeed, n_trainable = self._prepare()
        ema = None
        if cfg.ema_decay is not None:  # after prepare: the parameter objects the engine updates in place
            ema = EMA(acc.unwrap_model(model).named_parameters(), cfg.ema_decay, cfg.ema_warmup).to(acc.device)
        skip_on_device = (not use_deepspeed and acc.scaler is None  # fp16's GradScaler sets found_inf itself
                          and bool(innermost_optimizer(opt).defaults.get("fused")))
        state = TrainState(model=model, opt=opt, ema=ema, lr_at=lr_lambda(cfg.optim, cfg.max_steps),
                           use_deepspeed=use_deepspeed, skip_on_device=skip_on_device, result=TrainResult(step=0))
        self._resume(state)
        state.result.step = state.step
        if acc.is_main_process:
            acc.init_trackers(self.stage.name)
            world, micro = self.data_parallel_size, self.micro_batch_size
            log.info("stage %s under %s: %d trainable parameters; global batch %d = micro-batch %d × %d accumulation "
                     "× %d data-parallel ranks", self.stage.name, strategy_name(acc), n_trainable,
                     micro * cfg.grad_accum * world, micro, cfg.grad_accum, world)
            if cfg.progress:
                from tqdm.auto import tqdm

                state.pbar = tqdm(total=cfg.max_steps, initial=state.step, desc=self.stage.name, dynamic_ncols=True)
        state.batches = iter(self.loader)
        state.window = LogWindow()
        model.train()
        return state

    def _prepare(self) -> tuple[nn.Module, Any, bool, int]:
        """The optimizer over the stage's trainable parameters, and both through ``accelerator.prepare``; the frozen
        modules placed by the stage and checked to be whole. Returns (model, optimizer, under DeepSpeed, the number of
        trained parameters)."""
        cfg, acc, stage = self.cfg, self.accelerator, self.stage
        model = stage.trainable()
        params = list(stage.parameters_to_optimize(model))
        if not params:
            raise ValueError(f"stage {stage.name!r}: nothing to train (no parameter requires grad)")
        n_trainable = sum(p.numel() for p in params)  # before prepare: ZeRO-3 leaves shape (0,) placeholders
        self._skeleton = meta_skeleton(model)  # for evaluation copies, before any engine wraps or partitions it
        if cfg.channels_last:  # the speed options (training.speedups), after the skeleton: evaluation runs plain
            apply_channels_last(model)
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
        opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                weight_decay=cfg.optim.weight_decay,
                                **adamw_kernel(cfg.optim.implementation, strategy_name(acc)))
        if self.sequence_parallel > 1:  # after the skeleton: evaluation copies run whole, without collectives
            attach_sequence_parallel(model, self.sequence_parallel)
        check_strategy_honoured(acc)
        self._check_accumulation()
        use_deepspeed = deepspeed_plugin(acc) is not None
        if use_deepspeed:
            prepare_deepspeed_config(acc, self.micro_batch_size, cfg.grad_accum, cfg.optim.max_grad_norm)
            half = deepspeed_autocast_dtype(acc)
            if half is not None:  # DeepSpeed casts the weights, not the inputs, and turns off an outer autocast
                autocast_forward(model, acc.device.type, half)
        prepare_fsdp2_wrapping(acc, model)  # FSDP: this model's own repeated blocks become the FSDP units
        model, opt = acc.prepare(model, opt)  # only the trained module: frozen ones stay whole, out of the optimizer
        self._check_accumulation()
        if cfg.compile == "blocks":  # after prepare: FSDP2 wraps the blocks first
            compile_blocks(acc.unwrap_model(model))
        stage.setup(acc.device, self._weight_dtype())
        partitioned = frozen_sharded_parameters(stage.frozen_modules())
        if partitioned:
            raise RuntimeError(f"stage {stage.name!r}: frozen parameters were sharded by the engine (they must stay "
                               f"whole and out of the optimizer): {partitioned[:5]}")
        return model, opt, use_deepspeed, n_trainable

    def _resume(self, state: TrainState) -> None:
        """Restore the step, counters, loader position and EMA from the checkpoint ``train.resume`` names (the model,
        optimizer and RNG states through Accelerate's ``load_state``)."""
        acc = self.accelerator
        resume_from = resolve_resume(self.cfg.resume, self.run_dir)
        if resume_from is None:
            return
        restored = load_checkpoint(acc, resume_from)
        state.step = int(restored["trainer"]["step"])
        state.nonfinite_total = int(restored["trainer"].get("nonfinite_total", 0))
        if restored["loader"] is not None:
            self.loader.load_state_dict(restored["loader"])
        if state.ema is not None and restored["ema"] is not None:
            state.ema.load_full_state_dict(restored["ema"])
        if acc.is_main_process:
            log.info("resumed from %s at step %d", resume_from, state.step)

    # ------------------------------------------------------------------------------------------ per step

    def _next_batch(self, state: TrainState) -> Any:
        """The loader's next batch, on the device (a new epoch when one ends); the wait and the samples are counted
        in the logging window."""
        t0 = time.perf_counter()
        acc, limit = self.accelerator, self.data_timeout_s

        def stalled() -> str:
            return (f"rank {acc.process_index}/{acc.num_processes}: no batch from the data loader for {limit:g} s at "
                    f"step {state.step + 1} (train.data_timeout_s); the loader is stuck (a hung read, a slow or "
                    "unreachable data source), and the other ranks would wait for this one at their next collective")

        with _deadline(limit, stalled):
            try:
                batch = next(state.batches)
            except StopIteration:
                state.batches = iter(self.loader)  # next epoch
                try:
                    batch = next(state.batches)
                except StopIteration:
                    raise RuntimeError(
                        f"stage {self.stage.name!r}: the data loader yielded no batch in a whole epoch"
                    ) from None
        state.window.data_time += time.perf_counter() - t0
        device = self.accelerator.device
        if isinstance(batch, Batch):  # from pinned memory (data.pin_memory) the copy runs alongside the step
            batch = batch.to(device, non_blocking=device.type == "cuda")
        elif hasattr(batch, "to"):
            batch = batch.to(device)
        state.window.samples += len(batch) if hasattr(batch, "__len__") else 0
        return batch

    def _end_of_step(self, state: TrainState, logs: Any, stop: _StopFlag) -> bool:
        """After :meth:`train_step`: add the step's logs to the window (read from the device with the window, when
        the skipped steps are counted — stop after too many in a row); then the interval work — progress, log line,
        checkpoint, validation. True: a signal arrived on some rank, the checkpoint is written and training stops."""
        cfg, step = self.cfg, state.step
        self._count_step(state, logs)
        if state.pbar is not None:
            state.pbar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            self._log_window(state)
        stopping = self._any_rank_true(stop.signal is not None)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stopping:
            self._save(state)
        if stopping:
            if self.accelerator.is_main_process:
                log.warning("received signal %s: checkpoint saved at step %d, exiting", stop.signal, step)
            state.result.stopped_by_signal = stop.signal or -1
        elif cfg.validate_every and step % cfg.validate_every == 0 and step != cfg.max_steps:
            self._validate(state.model, state.ema, step, state.result)  # the last one comes with the export
        return stopping

    def _count_step(self, state: TrainState, logs: Any) -> None:
        """Queue the step's :class:`StepLogs` in the window (a ``train_step`` override may also return the older
        forms: a dict of floats, or None for a skipped step)."""
        if logs is None:
            logs = StepLogs(values={}, skipped=True)
        elif not isinstance(logs, StepLogs):
            logs = StepLogs(values=dict(logs), skipped=False)
        state.window.pending.append((state.step, logs))

    def _read_window(self, state: TrainState) -> None:
        """Read the window's queued step logs from the device (one transfer for all of them), add the finite steps'
        values to its sums, count the skipped steps (a warning) and stop after ``max_nonfinite_steps`` in a row."""
        pending, state.window.pending = state.window.pending, []
        if not pending:
            return
        tensors = [t for _, lg in pending for t in (lg.skipped, *lg.values.values()) if isinstance(t, torch.Tensor)]
        read = iter(torch.stack([t.to(torch.float64) for t in tensors]).tolist() if tensors else [])
        skipped_steps = []
        for step, lg in pending:
            skipped = bool(next(read)) if isinstance(lg.skipped, torch.Tensor) else bool(lg.skipped)
            values = {k: next(read) if isinstance(v, torch.Tensor) else v for k, v in lg.values.items()}
            if not skipped:
                state.consecutive_bad = 0
                for k, v in values.items():
                    state.window.sums[k] = state.window.sums.get(k, 0.0) + v
                state.window.steps += 1
                continue
            skipped_steps.append(step)
            state.nonfinite_total += 1
            state.consecutive_bad += 1
            if state.consecutive_bad >= self.cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{state.consecutive_bad} non-finite losses in a row (limit train.max_nonfinite_steps="
                    f"{self.cfg.max_nonfinite_steps}, up to step {step}); the last checkpoint is intact under "
                    f"{self.run_dir}. Lower the learning rate, check the data, or use bf16 instead of fp16."
                )
        if skipped_steps and self.accelerator.is_main_process:
            log.warning("step(s) %s: non-finite loss on some rank; update skipped (%d in a row, %d in all)",
                        ", ".join(map(str, skipped_steps)), state.consecutive_bad, state.nonfinite_total)

    def _log_window(self, state: TrainState) -> None:
        """Log the window's means (over ranks), the LR, throughput, data wait, skipped steps and the loader's
        skipped samples; then open a new window."""
        self._read_window(state)
        acc, window = self.accelerator, state.window
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        scalars = {k: v / max(window.steps, 1) for k, v in window.sums.items()}
        scalars = self._mean_across_ranks(scalars)
        scalars.update({
            "lr": state.lr,
            "samples_per_s": window.samples * self.data_parallel_size / elapsed,
            "data_wait_fraction": window.data_time / elapsed,
            "nonfinite_steps": float(state.nonfinite_total),
        })
        for reason, n in (self.loader.stats().get("skipped") or {}).items():
            scalars[f"data/skipped_{reason}"] = float(n)
        acc.log(scalars, step=state.step)
        state.result.metrics.update(scalars)
        if state.pbar is not None:
            state.pbar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", lr=f"{scalars['lr']:.2e}",
                                   sps=f"{scalars['samples_per_s']:.0f}", wait=f"{scalars['data_wait_fraction']:.0%}")
        state.window = LogWindow()

    def _save(self, state: TrainState) -> None:
        """A checkpoint at ``state.step`` (collective: the EMA is gathered on every rank, rank 0 writes it)."""
        self._read_window(state)  # the skipped-step count is saved
        acc, ema = self.accelerator, state.ema
        ema_state = None
        if ema is not None:
            if not ema.tracks(acc.unwrap_model(state.model).named_parameters()):
                raise RuntimeError(f"stage {self.stage.name!r}: the trained module's parameters are no longer the "
                                   "objects the EMA was built on (something replaced them after prepare)")
            ema_state = ema.full_state_dict(dst=0)
        save_checkpoint(
            acc, self.run_dir, state.step,
            {"nonfinite_total": state.nonfinite_total, "stage": self.stage.name},
            self.loader.state_dict(), ema_state, self.config_yaml, self.cfg.keep_checkpoints,
        )

    # ------------------------------------------------------------------------------------------- the end

    def _finish(self, state: TrainState) -> TrainResult:
        """Close the progress bar; unless stopped by a signal, the last validation and the export (one evaluation
        copy); close the trackers."""
        acc, result = self.accelerator, state.result
        if state.pbar is not None:
            state.pbar.close()
        result.step = state.step
        if result.stopped_by_signal is None:
            final = self.eval_model(state.model, state.ema)  # collective; the consolidated weights on the main process
            self._validate_copy(final, state.step, result)  # the last validation and the export share one copy
            if final is not None:
                result.export_path = self.stage.export(final, self.run_dir / "export")
                if result.export_path is not None and self.config_yaml is not None:
                    (self.run_dir / "export" / "run_config.yaml").write_text(self.config_yaml)
            del final
        acc.wait_for_everyone()
        for tracker in acc.trackers:  # not acc.end_training(): it destroys the process group, which the next stage
            tracker.finish()          # of a pipeline (and the caller's collectives) still need
        return result

    def _log_media(self, step: int) -> None:
        """The stage's validation pictures and clips into TensorBoard (when this process logs to it)."""
        media = self.stage.take_media()
        writer = next((t.tracker for t in self.accelerator.trackers if t.name == "tensorboard"), None)
        if media and writer is not None:
            from training.tensorboard_media import log_media

            log_media(writer, media, step)

    def _validate(self, model: nn.Module, ema: Optional[EMA], step: int, result: TrainResult) -> None:
        eval_model = self.eval_model(model, ema)  # collective: ZeRO-3 / FSDP gather here, on every rank
        self._validate_copy(eval_model, step, result)
        del eval_model
        model.train()

    def _validate_copy(self, eval_model: Optional[nn.Module], step: int, result: TrainResult) -> None:
        """The stage's validation on an evaluation copy (None on the ranks that hold none), then a barrier."""
        acc = self.accelerator
        if eval_model is not None:
            with torch.no_grad():
                metrics = self.stage.validate(eval_model, step, self.run_dir / "validation")
            self._log_media(step)
            if metrics:
                acc.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
                result.metrics.update({f"val/{k}": v for k, v in metrics.items()})
                log.info("step %d validation: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        acc.wait_for_everyone()
