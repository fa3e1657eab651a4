"""What changes when the trained parameters are sharded (DeepSpeed ZeRO-3, PyTorch FSDP2), kept in one place.

Under DDP and ZeRO-1/2 every rank holds every parameter whole. Under ZeRO-3 a parameter outside its forward is an
empty tensor of shape ``(0,)``; rank ``r`` of the parameter's group keeps the slice
``[r·s, (r+1)·s)`` of the flattened tensor, zero-padded to ``s·world`` elements, in ``param.ds_tensor`` (DeepSpeed's
``partition_parameters``; Rajbhandari et al. 2020). Under FSDP2 a parameter is a ``DTensor`` sharded on dim 0 and
``param.to_local()`` is this rank's chunk (Zhao et al. 2023). Three functions hide the difference:

* :func:`local_shard` — the part of a parameter this rank owns (the whole tensor when nothing is sharded);
* :func:`gather_full` — the full tensor from every rank's part (collective), laid out like the parameter;
* :func:`shard_of` — this rank's part of a full tensor (no communication), laid out like :func:`local_shard`.

The EMA keeps the average of :func:`local_shard` (no communication per step, memory divided like the model's) and
uses the other two to write and read a consolidated EMA; the trainer builds evaluation copies from a meta-device
skeleton of the model taken before it was wrapped (:func:`meta_skeleton`, :func:`materialize`). The DeepSpeed
config's ``auto`` values are filled from our config (:func:`fill_deepspeed_config`) because our data loader is not
prepared by Accelerate, which would otherwise infer them. Under FSDP2 each model's own repeated blocks become the
FSDP units (:func:`prepare_fsdp2_wrapping`), whatever model the process prepared before.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# ZeRO keys whose "auto" Accelerate can only fill from ``model.config.hidden_size`` (HF models); ours get
# DeepSpeed's own defaults instead (the key is dropped), the same for every model of a pipeline.
_HIDDEN_SIZE_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


# --------------------------------------------------------------------------------------------- which strategy


def strategy_name(accelerator: Any) -> str:
    """``single``, ``ddp``, ``zero1``/``zero2``/``zero3``, ``fsdp1``/``fsdp2`` (logged and saved in checkpoints)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"zero{deepspeed_stage(accelerator)}"
    if kind == DistributedType.FSDP:
        return "fsdp2" if getattr(accelerator, "is_fsdp2", False) else "fsdp1"
    if kind == DistributedType.NO:
        return "single"
    return "ddp"


def innermost_optimizer(optimizer: Any) -> Any:
    """The optimizer that steps the weights, under Accelerate's wrapper and DeepSpeed's ZeRO optimizer (e.g. the
    client ``AdamW``, or the ``DeepSpeedCPUAdam`` Accelerate swaps in for CPU offload)."""
    while getattr(optimizer, "optimizer", None) not in (None, optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def deepspeed_plugin(accelerator: Any) -> Any:
    """The active DeepSpeed plugin, or None when DeepSpeed is not in use."""
    return getattr(accelerator.state, "deepspeed_plugin", None)


def deepspeed_stage(accelerator: Any) -> Optional[int]:
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def deepspeed_autocast_dtype(accelerator: Any) -> Optional[torch.dtype]:
    """The half dtype DeepSpeed trains in (its ``bf16``/``fp16`` section), or None (see :func:`autocast_forward`)."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return None
    cfg = plugin.deepspeed_config
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if str(cfg.get(key, {}).get("enabled", False)).lower() == "true":
            return dtype
    return None


def check_strategy_honoured(accelerator: Any) -> None:
    """Raise when the launcher asked for DeepSpeed or FSDP (``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP``,
    set by ``accelerate launch`` with such a config) but Accelerate set up something else: it does so silently, and a
    run the user believes sharded would be plain data parallelism (or one process)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and kind != DistributedType.DEEPSPEED:
        raise ValueError(
            f"the launch asked for DeepSpeed but Accelerate set up {kind.value}: Accelerate turns DeepSpeed off when "
            "asked for the CPU (train.cpu: true); on a machine without a GPU leave train.cpu false (the CPU is used "
            "anyway, DeepSpeed with its CPU accelerator: DS_ACCELERATOR=cpu)"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != DistributedType.FSDP:
        raise ValueError(
            f"the launch asked for FSDP but Accelerate set up {kind.value}: Accelerate enables FSDP only on GPUs "
            "(and not with train.cpu: true)"
        )


def _outputs_to_fp32(out: Any) -> Any:
    """Floating tensors (also inside tuples, lists and dicts) in fp32; anything else as it is."""
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        items = [_outputs_to_fp32(o) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)  # namedtuples too
    if isinstance(out, dict):
        return type(out)((k, _outputs_to_fp32(v)) for k, v in out.items())
    return out


def autocast_forward(module: nn.Module, device_type: str, dtype: torch.dtype) -> nn.Module:
    """Make ``module.forward`` run under ``torch.autocast(device_type, dtype)`` and return fp32 outputs.

    DeepSpeed's bf16/fp16 modes cast the weights to half precision but not the inputs, and its engine switches off
    any CUDA autocast opened around it (``deepspeed.runtime.torch_autocast.autocast_if_enabled``): fp32 latents then
    meet bf16 weights ("Input type (float) and bias type (BFloat16) should be the same"). The autocast must open
    inside the engine, in the module's own forward — as Accelerate does for its native AMP. The outputs come back
    in fp32 so the loss is computed in full precision. Apply it to the unwrapped module before ``prepare`` (after
    :func:`meta_skeleton`, which must not copy the override); applying it twice is a no-op.
    """
    if getattr(module, "_latentloom_autocast", None) is not None:
        return module
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = inner(*args, **kwargs)
        return _outputs_to_fp32(out)

    module.forward = forward
    module._latentloom_autocast = dtype
    return module


# ------------------------------------------------------------------------------------ DeepSpeed config values


def _set_or_check(cfg: dict, key: str, value: Any, ours: str) -> None:
    """Fill ``cfg[key]`` when it is missing or "auto"; an explicit different value is an error naming both."""
    current = cfg.get(key, "auto")
    if current == "auto":
        cfg[key] = value
    elif current != value:
        raise ValueError(
            f"DeepSpeed config {key}={current!r} disagrees with {ours}={value!r}: set it to \"auto\" in the "
            "DeepSpeed JSON (the trainer fills it from the run config) or change the run config"
        )


def fill_deepspeed_config(
    cfg: dict,
    micro_batch_size: Optional[int],
    grad_accum: int,
    world_size: int,
    max_grad_norm: Optional[float],
) -> dict:
    """Fill a DeepSpeed config's ``auto`` values from the run config, in place; returns ``cfg``.

    * ``train_micro_batch_size_per_gpu`` = the per-rank batch the loader yields,
    * ``gradient_accumulation_steps`` = ``train.grad_accum`` (DeepSpeed divides the loss by it in ``backward``,
      as Accelerate does under DDP),
    * ``train_batch_size`` = micro × accumulation × world size (DeepSpeed checks the identity),
    * ``gradient_clipping`` = ``train.optim.max_grad_norm`` (0: none; Accelerate would put 1.0 there),
    * ZeRO-3: ``stage3_gather_16bit_weights_on_model_save`` = true, which ``Accelerator.get_state_dict`` needs to
      consolidate the weights for validation and export;
    * the bucket sizes left "auto" (which Accelerate derives from ``model.config.hidden_size``, absent from our
      autoencoder) are dropped: DeepSpeed's defaults apply.

    Values set explicitly in the JSON must agree with the run config (else ``ValueError``): a different
    accumulation or clipping under DeepSpeed than under DDP would silently change the training.
    """
    if micro_batch_size is None:
        if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            raise ValueError(
                "DeepSpeed needs the per-rank micro-batch size (train_micro_batch_size_per_gpu): pass "
                "micro_batch_size or set it in the JSON"
            )
        micro_batch_size = int(cfg["train_micro_batch_size_per_gpu"])
    _set_or_check(cfg, "train_micro_batch_size_per_gpu", int(micro_batch_size), "the loader's batch size")
    _set_or_check(cfg, "gradient_accumulation_steps", int(grad_accum), "train.grad_accum")
    _set_or_check(cfg, "train_batch_size", int(micro_batch_size) * int(grad_accum) * int(world_size),
                  "micro-batch × train.grad_accum × world size")
    _set_or_check(cfg, "gradient_clipping", float(max_grad_norm or 0.0), "train.optim.max_grad_norm")
    zero = cfg.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    for key in _HIDDEN_SIZE_KEYS:
        if zero.get(key) == "auto":
            del zero[key]
    return cfg


def prepare_deepspeed_config(accelerator: Any, micro_batch_size: Optional[int], grad_accum: int,
                             max_grad_norm: Optional[float]) -> Optional[dict]:
    """Fill the active DeepSpeed plugin's config before ``accelerator.prepare`` (no-op without DeepSpeed).

    The plugin's dict is shared by every Accelerator of the process (one per stage of a pipeline), and both this
    function and ``prepare`` write into it: the first call keeps a pristine copy and every call starts from it, so
    each stage gets its own batch size and accumulation.
    """
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return None
    cfg = plugin.deepspeed_config
    template = getattr(plugin, "_latentloom_template", None)
    if template is None:
        template = copy.deepcopy(cfg)
        plugin._latentloom_template = template
    cfg.clear()
    cfg.update(copy.deepcopy(template))
    return fill_deepspeed_config(cfg, micro_batch_size, grad_accum, accelerator.num_processes, max_grad_norm)


# ----------------------------------------------------------------------------------------- FSDP2 wrapping


def set_fsdp_block_classes(plugin: Any, model: nn.Module) -> Optional[list[str]]:
    """Point an Accelerate ``FullyShardedDataParallelPlugin`` with ``TRANSFORMER_BASED_WRAP`` at ``model``'s own
    repeated blocks (the classes it names in ``_no_split_modules``, :func:`models.utils.block_class_names`), so that
    ``prepare`` shards each block as its own FSDP unit and the rest of the model as the root unit. Returns the
    class names, or None when the plugin wraps by another policy (left as configured).

    A class list given in the launch file (``fsdp_transformer_layer_cls_to_wrap``) is kept. Needed before every
    ``prepare``: Accelerate writes the first model's classes into the plugin, which every Accelerator of the process
    shares (one per stage), so a second model — the DiT after the autoencoder — would be searched for the
    autoencoder's blocks. The first call keeps the plugin's configured policy and list; each call starts from them.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from models.utils import block_class_names

    template = getattr(plugin, "_latentloom_wrap_template", None)
    if template is None:
        template = (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap)
        plugin._latentloom_wrap_template = template
    policy, configured = template
    plugin.auto_wrap_policy = policy  # undo the previous prepare's functools.partial
    if (policy.func if isinstance(policy, functools.partial) else policy) is not transformer_auto_wrap_policy:
        plugin.transformer_cls_names_to_wrap = configured
        return None
    names = list(configured) if configured else block_class_names(model)
    if not names:
        log.warning("FSDP2: %s names no repeated blocks (_no_split_modules): it is sharded as a single unit",
                    type(model).__name__)
    plugin.transformer_cls_names_to_wrap = names
    return names


def prepare_fsdp2_wrapping(accelerator: Any, model: nn.Module) -> Optional[list[str]]:
    """Before ``accelerator.prepare(model, ...)`` under FSDP: :func:`set_fsdp_block_classes` on the active plugin
    (no-op, None, without FSDP)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        return None
    return set_fsdp_block_classes(plugin, model)


# ------------------------------------------------------------------------------------ one parameter's shards


def is_zero3_partitioned(p: Tensor) -> bool:
    return getattr(p, "ds_tensor", None) is not None and hasattr(p, "ds_numel")


def is_dtensor(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(p, DTensor)


def is_fsdp1_flat(p: Tensor) -> bool:
    return bool(getattr(p, "_fsdp_flattened", False) or getattr(p, "_is_flat_param", False))


def is_sharded(p: Tensor) -> bool:
    return is_zero3_partitioned(p) or is_dtensor(p) or is_fsdp1_flat(p)


def _unsupported(p: Tensor) -> None:
    if is_fsdp1_flat(p):
        raise NotImplementedError(
            "FSDP1 flattens parameters into per-rank flat shards that this trainer's EMA cannot address; use FSDP2 "
            "(fsdp_version: 2 in the Accelerate config, as in launch/accelerate/fsdp2.yaml) or disable the EMA"
        )
    if getattr(p, "ds_secondary_tensor", None) is not None:  # ZeRO++ hierarchical partitioning (hpZ)
        raise NotImplementedError("ZeRO++ secondary partitions (zero_hpz_partition_size > 1) are not supported")


def local_shard(p: Tensor) -> Tensor:
    """The part of ``p`` this rank owns: ``p`` itself (DDP, ZeRO-1/2, no distribution), the flat padded ZeRO-3
    partition ``p.ds_tensor`` ``(s,)``, or the FSDP2 local chunk ``p.to_local()``."""
    _unsupported(p)
    if is_zero3_partitioned(p):
        return p.ds_tensor
    if is_dtensor(p):
        return p.to_local()
    return p


def _zero3_geometry(p: Tensor) -> tuple[Any, int, int, int]:
    import torch.distributed as dist

    group = p.ds_process_group
    return group, dist.get_rank(group=group), dist.get_world_size(group=group), int(p.ds_tensor.ds_numel)


def gather_full(p: Tensor, shard: Tensor, dst: Optional[int] = 0) -> Optional[Tensor]:
    """The full tensor (shape of ``p``) from every rank's ``shard`` (laid out like :func:`local_shard`).

    Collective for sharded parameters: every rank of ``p``'s group must call it, in the same order. Returns the
    result on CPU, on rank ``dst`` of the default group only (``dst=None``: on every rank); ``shard`` itself is
    returned (on CPU) when ``p`` is not sharded.
    """
    import torch.distributed as dist

    _unsupported(p)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    keep = dst is None or rank == dst
    if is_zero3_partitioned(p):
        group, _, world, size = _zero3_geometry(p)
        if shard.numel() != size:
            raise ValueError(f"shard of {size} elements expected for a ZeRO-3 partition, got {shard.numel()}")
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard.contiguous(), group=group)
        full = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)  # drop the padding of the last partition
        return full.cpu() if keep else None
    if is_dtensor(p):
        from torch.distributed.tensor import DTensor

        dt = DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        full = dt.full_tensor()
        return full.cpu() if keep else None
    return shard.detach().cpu() if keep else None


def shard_of(p: Tensor, full: Tensor) -> Tensor:
    """This rank's part of ``full`` (a tensor shaped like ``p``), laid out like ``local_shard(p)``; no
    communication (every rank holds ``full``)."""
    _unsupported(p)
    expected = tuple(p.ds_shape) if is_zero3_partitioned(p) else tuple(p.shape)
    if tuple(full.shape) != expected:
        raise ValueError(f"full tensor of shape {tuple(full.shape)} for a parameter of shape {expected}")
    if is_zero3_partitioned(p):
        _, rank, _, size = _zero3_geometry(p)
        flat = full.reshape(-1)
        piece = flat[rank * size: (rank + 1) * size]
        if piece.numel() < size:  # the last partition is zero-padded
            piece = torch.cat([piece, piece.new_zeros(size - piece.numel())])
        return piece.clone()
    if is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        local_device = p.to_local().device
        dt = distribute_tensor(full.to(local_device), p.device_mesh, p.placements, src_data_rank=None)
        return dt.to_local().clone()
    return full.clone()


def frozen_sharded_parameters(modules: dict[str, nn.Module]) -> list[str]:
    """Names (``module.param``) of parameters of frozen modules that a sharding engine took over (ZeRO-3 partitions
    or DTensors): frozen modules must stay whole, out of the optimizer and of ``zero.Init``."""
    found = []
    for mname, module in modules.items():
        for pname, p in module.named_parameters():
            if is_sharded(p) or hasattr(p, "ds_id"):
                found.append(f"{mname}.{pname}")
    return found


# ---------------------------------------------------------------------------- evaluation copies of the model


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters live on the meta device (no memory), buffers copied.

    Taken before ``accelerator.prepare``: it keeps the architecture and each parameter's dtype, free of the hooks,
    partitioned placeholders and DTensors that DeepSpeed or FSDP put into the live module.
    """
    memo: dict[int, Any] = {}
    for p in module.parameters():
        if is_sharded(p):
            raise ValueError("meta_skeleton: take the skeleton before the module is sharded (before prepare)")
        memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
    skeleton = copy.deepcopy(module, memo)
    if "_latentloom_autocast" in skeleton.__dict__:  # the override would call the live module's forward
        del skeleton.__dict__["forward"], skeleton.__dict__["_latentloom_autocast"]
    return skeleton


def materialize(skeleton: nn.Module, state: dict[str, Tensor], device: torch.device | str) -> nn.Module:
    """A real module on ``device`` built from ``skeleton`` and a consolidated ``state`` dict (strict).

    A trained parameter gets the skeleton's dtype (the dtype it had before DeepSpeed cast it), so an evaluation copy
    of a bf16 DeepSpeed model is fp32 like under DDP. A frozen one (a LoRA base) keeps the dtype ``state`` holds it in,
    as the live model does: a base held in bf16 is not doubled to fp32 in every copy. Returned in eval mode, without
    gradients.
    """
    model = copy.deepcopy(skeleton)
    made: dict[int, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:
                held = state.get(f"{prefix}.{name}" if prefix else name)
                dtype = held.dtype if not p.requires_grad and held is not None and held.is_floating_point() \
                    else p.dtype
                made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False)
            module._parameters[name] = made[id(p)]
    model.to(device)  # buffers
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------- process helpers


def wait_for_main_process(work: Callable[[], Any], hours: float = 24.0) -> Any:
    """Run ``work`` on global rank 0 while the other ranks wait, however long it takes.

    A plain barrier would time out after the process group's collective timeout (NCCL: 10 minutes) while rank 0
    encodes a large data set; the wait happens on a separate gloo group with a timeout of ``hours``. If rank 0 fails,
    the launcher (torchrun, accelerate) stops the waiting ranks. Returns ``work()``'s result on rank 0, None elsewhere.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return work()
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=hours))
    try:
        result = work() if dist.get_rank() == 0 else None
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)
    return result

