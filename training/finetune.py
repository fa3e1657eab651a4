"""LoRA adapters for the fine-tuning stages (``lora``, ``dpo``) and for ``loom sample lora=[...]``.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a weight ``W`` and learns a
low-rank update ``ΔW = s · B A`` (``A``: r × in, ``B``: out × r, ``s = alpha / r``, or ``alpha / √r`` with
rank-stabilised LoRA, Kalajdzievski 2023). ``B`` starts at zero, so an adapted model starts exactly equal to its
base. Adapters are injected by peft into the denoiser's attention projections (``models.attention.LORA_TARGETS``),
optionally its feed-forward layers and input/output projections; U-Net and DiT share the attention module, so one
code path serves both.

An adapter file is one small safetensors file holding only the ``lora_A`` / ``lora_B`` tensors, named relative to
the denoiser (``blocks.0.attn.to_q.lora_A.weight``), with everything needed to attach it again in its header
metadata (key ``latentloom``, JSON): the adapter config, the adapted module names, the denoiser kind and a SHA-256
fingerprint of the base weights it was trained against. ``<name>.json`` beside it repeats the metadata for people.
The same adapter can be written in diffusers/PEFT or kohya layout (``save_adapter(..., format=...)``, ``loom lora``),
and files in those layouts load like ours (:mod:`training.lora_formats`).

At sampling time several adapters can be attached at once, each under its own name and with its own scale
(``ΔW_i`` multiplied by ``scale_i``); their updates add up (``W + Σ scale_i ΔW_i``). Merging folds the active
adapters into the base weights (plain-Linear speed); unmerging subtracts them again.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from models.attention import LORA_FEEDFORWARD_TARGETS, LORA_PROJECTION_TARGETS, LORA_TARGETS
from training.config_io import from_dict, to_dict

log = logging.getLogger(__name__)

TargetGroup = Literal["attention", "feedforward", "projection", "temporal"]
# group -> module-name suffixes it selects; "temporal" has none: the model declares its temporal parts
# (``temporal_module_prefixes()``, see :func:`temporal_prefixes`) and every Linear/Conv inside them is selected
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": LORA_TARGETS,
    "feedforward": LORA_FEEDFORWARD_TARGETS,
    "projection": LORA_PROJECTION_TARGETS,
    "temporal": (),
}
TEMPORAL_DECLARATION = "temporal_module_prefixes"  # the method a video denoiser lists its temporal parts with
ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Conv3d)  # layer types peft's LoRA adapts here
PEFT_PREFIX = "base_model.model."  # peft's prefix of the wrapped model's parameter names
ADAPTER_FORMAT = "latentloom-lora-1"
METADATA_KEY = "latentloom"


@dataclass
class LoraAdapterConfig:
    """One LoRA adapter: where it goes and its rank, scale, dropout and initialisation."""

    rank: int = 8  # r, the rank of each update B·A
    alpha: Optional[float] = None  # the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora); null: rank
    dropout: float = 0.0  # dropout on the adapter branch's input while training
    init: Literal["kaiming", "gaussian"] = "kaiming"  # A's initialisation (B starts at 0 either way: ΔW = 0)
    # attention, feedforward, projection, temporal (every layer of a video denoiser's temporal parts); a union
    targets: list[TargetGroup] = field(default_factory=lambda: ["attention"])
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank) (Kalajdzievski 2023)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank: {self.rank} must be >= 1")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"alpha: {self.alpha} must be > 0 or null (= rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: {self.dropout} must be in [0, 1)")
        if not self.targets:
            raise ValueError(f"targets: empty; allowed: a list of {', '.join(TARGET_GROUPS)}")
        unknown = [t for t in self.targets if t not in TARGET_GROUPS]
        if unknown:
            raise ValueError(f"targets: {unknown} unknown; allowed: {', '.join(TARGET_GROUPS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: {self.targets} names a group twice")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def scaling(self) -> float:
        """The factor s in ΔW = s · B A."""
        return self.lora_alpha / (self.rank ** 0.5 if self.rslora else self.rank)


# ------------------------------------------------------------------------------------------------- targets


def _matches(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def temporal_prefixes(model: nn.Module) -> list[str]:
    """Full names of the submodules of ``model`` that act across frames, as the denoisers inside it declare them:
    a module with a ``temporal_module_prefixes()`` method (the video U-Net: its temporal ResBlocks, temporal
    transformer blocks and frame embeddings; a factorised video DiT: its temporal blocks) lists them relative to
    itself. A model that declares none (an image model) or cannot have any (a full-attention video DiT, whose every
    block attends across space and time at once: its method says why) is an error naming it."""
    found: list[str] = []
    declared = False
    for name, module in model.named_modules():
        declare = getattr(module, TEMPORAL_DECLARATION, None)
        if not callable(declare):
            continue
        declared = True
        try:
            prefixes = list(declare())
        except ValueError as e:
            raise ValueError(f"targets: temporal: {e}") from e
        found += [f"{name}.{p}" if name else p for p in prefixes]
    if not declared:
        raise ValueError(f"targets: temporal: {type(model).__name__} has no temporal layers (it declares none with "
                         f"{TEMPORAL_DECLARATION}()); temporal targets are for video denoisers (the video U-Net, a "
                         "factorised video DiT)")
    if not found:
        raise ValueError(f"targets: temporal: {type(model).__name__} declares no temporal layers")
    return sorted(set(found))


def lora_target_names(model: nn.Module, groups: Sequence[str]) -> list[str]:
    """Full names of the layers of ``model`` the target groups select (Linear / Conv only), in module order: the
    union of the groups. ``attention`` / ``feedforward`` / ``projection`` match module-name suffixes; ``temporal``
    selects every such layer inside the temporal parts the model declares (:func:`temporal_prefixes`)."""
    adaptable = [(n, m) for n, m in model.named_modules() if isinstance(m, ADAPTABLE)]
    feedforward = {n for n, _ in adaptable if _matches(n, LORA_FEEDFORWARD_TARGETS)}
    temporal = temporal_prefixes(model) if "temporal" in groups else []
    out = []
    for name, _ in adaptable:
        for group in groups:
            if group == "projection" and name in feedforward:
                continue
            if group == "temporal":
                if any(name == p or name.startswith(p + ".") for p in temporal):
                    out.append(name)
                    break
            elif _matches(name, TARGET_GROUPS[group]):
                out.append(name)
                break
    if not out:
        raise ValueError(f"targets: {list(groups)} select no Linear/Conv layer of {type(model).__name__}")
    return out


def peft_config(cfg: LoraAdapterConfig, target_names: Sequence[str], rank_pattern: Optional[dict[str, int]] = None,
                alpha_pattern: Optional[dict[str, float]] = None) -> Any:
    """The peft ``LoraConfig`` for ``cfg`` on exactly ``target_names`` (per-layer ranks / alphas: the patterns)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout,
                      target_modules=list(target_names), bias="none", use_rslora=cfg.rslora,
                      init_lora_weights=True if cfg.init == "kaiming" else "gaussian",
                      rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}))


def add_lora(model: nn.Module, cfg: LoraAdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap ``model`` (in place) in a peft model with one trainable adapter; every base weight is frozen."""
    from peft import get_peft_model

    wrapped = get_peft_model(model, peft_config(cfg, lora_target_names(model, cfg.targets)),
                             adapter_name=adapter_name)
    wrong = [n for n, p in wrapped.named_parameters() if p.requires_grad and not is_adapter_name(n)]
    if wrong:  # peft marks only adapters trainable; make sure nothing else slipped through
        raise RuntimeError(f"LoRA: non-adapter parameters left trainable: {wrong[:5]}")
    return wrapped


def is_adapter_name(name: str) -> bool:
    """True for a LoRA tensor's parameter / state-dict name (``...to_q.lora_A.default.weight``)."""
    return any(part.startswith("lora_") for part in name.split("."))


# ------------------------------------------------------------------------------------------------ handles


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DeepSpeed / compiled wrapper (Accelerate's mixed-precision forward is kept)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=True)


def as_peft(model: nn.Module) -> Any:
    from peft import PeftModel

    inner = unwrap(model)
    if not isinstance(inner, PeftModel):
        raise TypeError(f"expected a denoiser with LoRA adapters (a peft model), got {type(inner).__name__}")
    return inner


def base_module(model: nn.Module) -> nn.Module:
    """The denoiser itself (with its LoRA layers still in place when it has adapters)."""
    from peft import PeftModel

    inner = unwrap(model)
    return inner.get_base_model() if isinstance(inner, PeftModel) else inner


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: the adapted model computes exactly its base model (the DPO reference, no second copy)."""
    peft_model = as_peft(model)
    with peft_model.disable_adapter():
        yield peft_model


def lora_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in base_module(model).modules() if isinstance(m, LoraLayer)]


# ----------------------------------------------------------------------------------------- weights, memory


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base weights in the denoiser's own naming (adapter tensors left out, peft's ``base_layer`` folded)."""
    out = {}
    for name, tensor in base_module(model).state_dict().items():
        if is_adapter_name(name):
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def weights_fingerprint(state: dict[str, Tensor]) -> str:
    """SHA-256 over names, shapes and float32 values of a state dict (stable across devices and wrappers)."""
    return weights_fingerprints(state, (torch.float32,))[torch.float32]


HALF_DTYPES = (torch.bfloat16, torch.float16)


def weights_fingerprints(state: dict[str, Tensor],
                         dtypes: Sequence[torch.dtype] = (torch.float32, *HALF_DTYPES)) -> dict[torch.dtype, str]:
    """:func:`weights_fingerprint` of ``state`` with every floating tensor first rounded to each of ``dtypes``, in
    one pass (one tensor copy at a time): what the weights look like once an engine or ``cast_frozen_`` holds them
    in half precision, so that "unchanged" can be checked exactly there too. The float32 entry is
    :func:`weights_fingerprint` itself; a half dtype's entry hashes the rounded values' own 16 bits."""
    hashers = {d: hashlib.sha256() for d in dtypes}
    for name in sorted(state):
        t = state[name].detach().to("cpu")
        for dtype, h in hashers.items():
            if dtype in HALF_DTYPES and t.is_floating_point():
                v = t.to(dtype).contiguous().view(torch.int16)  # numpy has no bfloat16: hash the raw bits
            else:
                v = t.to(torch.float32).contiguous()
            h.update(f"{name}{tuple(v.shape)}".encode())
            h.update(v.numpy().tobytes())
    return {d: h.hexdigest() for d, h in hashers.items()}


def held_dtype(state: dict[str, Tensor]) -> Optional[torch.dtype]:
    """The precision the floating tensors of ``state`` carry: their dtype when they share a half dtype; for float32
    tensors the narrowest of bf16 / fp16 that holds every value exactly (an fp32 copy of weights an engine kept in
    bf16), else float32. None when the tensors are held in different half dtypes."""
    floats = [t for t in state.values() if t.is_floating_point()]
    dtypes = {t.dtype for t in floats}
    if len(dtypes) > 1 or (dtypes and dtypes != {torch.float32}):
        return dtypes.pop() if len(dtypes) == 1 else None
    for dtype in HALF_DTYPES:
        if all(torch.equal(t, t.to(dtype).to(t.dtype)) for t in floats):
            return dtype
    return torch.float32


def cast_frozen_(model: nn.Module, dtype: torch.dtype) -> int:
    """Hold every frozen floating parameter of ``model`` in ``dtype`` (trainable ones stay fp32); returns how many
    were cast. Under mixed precision the frozen base then takes half the memory, as in diffusers' LoRA scripts."""
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def parameter_bytes(*modules: Optional[nn.Module]) -> int:
    """Bytes held by the parameters and buffers of ``modules``, each storage counted once (shared weights, views
    and a module listed twice do not count twice)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


# -------------------------------------------------------------------------------------------------- files


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors (fp32, CPU), named relative to the denoiser, without the adapter name."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(as_peft(model), adapter_name=adapter_name)
    return {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v.detach().to("cpu", torch.float32)
            .contiguous() for k, v in state.items()}


def save_adapter(
    model: nn.Module,
    path: str | Path,
    cfg: LoraAdapterConfig,
    *,
    denoiser: str,
    base_sha256: Optional[str],
    adapter_name: str = "default",
    extra: Optional[dict[str, Any]] = None,
    format: str = "ours",
) -> Path:
    """Write ``path`` (.safetensors, adapter tensors + metadata) and ``path.with_suffix('.json')``.

    ``format``: ``ours`` (the default; what ``loom sample --lora`` and the stages read back with every setting),
    ``diffusers`` (``unet.`` / ``transformer.`` PEFT keys, alpha in ``lora_adapter_metadata``: diffusers'
    ``load_lora_weights``) or ``kohya`` (``lora_unet_*`` with ``.alpha``: ComfyUI, A1111). The foreign layouts
    also carry our metadata in the header; all three load back into ``--lora`` (:mod:`training.lora_formats`)."""
    from safetensors.torch import save_file

    from training import lora_formats

    if format not in lora_formats.LORA_FILE_FORMATS:
        raise ValueError(f"format: got {format!r}; expected one of {list(lora_formats.LORA_FILE_FORMATS)}")
    path = Path(path)
    state = adapter_state_dict(model, adapter_name)
    targets = sorted({k.split(".lora_")[0] for k in state})  # peft may have shortened its own target list
    meta = {"format": ADAPTER_FORMAT, "adapter": to_dict(cfg), "targets": targets, "denoiser": denoiser,
            "base_sha256": base_sha256, **(extra or {})}
    header = {"format": "pt", METADATA_KEY: json.dumps(meta)}
    if format != "ours":
        layers = lora_formats.layers_from_ours(state, cfg.scaling)
        state, header = lora_formats.write(layers, base_module(model), format,
                                           {"latentloom_source": json.dumps(dict(meta, file_format=format))})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=header)
    tmp.replace(path)
    n = sum(v.numel() for v in state.values())
    readable = dict(meta, parameters=n, file_bytes=path.stat().st_size)
    path.with_suffix(".json").write_text(json.dumps(readable, indent=1))
    return path


@dataclass
class LoadedAdapter:
    """An adapter file read back: its tensors, config, adapted module names and metadata."""

    path: Path
    state: dict[str, Tensor]
    config: LoraAdapterConfig
    targets: list[str]
    meta: dict[str, Any]
    layers: Optional[dict[str, Any]] = None  # a diffusers / kohya file: its layers by foreign name (LayerLora)


def load_adapter(path: str | Path) -> LoadedAdapter:
    """Read an adapter file: ours (lora / dpo stage), or a diffusers/PEFT or kohya LoRA file, whose layer names
    are resolved against the denoiser when it is attached (:func:`attach_adapters`)."""
    from training import lora_formats
    from training.errors import read_safetensors, safetensors_metadata

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA adapter {path} does not exist")
    header = safetensors_metadata(path, "LoRA adapter")
    if METADATA_KEY not in header:
        state = read_safetensors(path, "LoRA adapter")
        what = f"LoRA adapter {path}"
        try:
            fmt = lora_formats.detect_format(list(state), header, METADATA_KEY)
        except ValueError as e:
            raise ValueError(f"{what}: {e}; expected a file written by the lora or dpo stage, or a diffusers/PEFT "
                             "or kohya LoRA") from None
        layers = (lora_formats.read_kohya(state, what) if fmt == "kohya"
                  else lora_formats.read_diffusers(state, header, what))
        if not layers:
            raise ValueError(f"{what}: holds no LoRA layer")
        rank = collections.Counter(v.rank for v in layers.values()).most_common(1)[0][0]
        return LoadedAdapter(path, state, LoraAdapterConfig(rank=rank), [], {"format": fmt}, layers)
    meta = json.loads(header[METADATA_KEY])
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"LoRA adapter {path}: format {meta.get('format')!r}, this version reads {ADAPTER_FORMAT!r}")
    cfg = from_dict(LoraAdapterConfig, meta["adapter"])
    return LoadedAdapter(path, read_safetensors(path, "LoRA adapter"), cfg, list(meta["targets"]), meta)


@dataclass
class AdapterSpec:
    """``"style.safetensors:0.8"`` → path and scale (no ``:scale``: 1.0)."""

    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "AdapterSpec":
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(head, float(tail))
            except ValueError:
                pass
        return cls(text, 1.0)


def attach_adapters(model: nn.Module, adapters: Sequence[tuple[LoadedAdapter, float]]) -> nn.Module:
    """Attach each adapter under its own name (``adapter_0``, ``adapter_1``, ...) with its scale, all active, in
    eval mode and frozen; returns the peft model (``model`` is changed in place). A base whose fingerprint differs
    from the one an adapter was trained on is allowed (adapters transfer to fine-tuned bases) but logged."""
    from peft import get_peft_model, set_peft_model_state_dict

    if not adapters:
        raise ValueError("attach_adapters: no adapter given")
    fingerprint = weights_fingerprint(base_state_dict(model))
    modules = {n for n, _ in model.named_modules()}
    wrapped, names = None, []
    resolved: dict[int, tuple[dict[str, Tensor], list[str], Any]] = {}
    for i, (adapter, _) in enumerate(adapters):  # foreign files: names resolved on the bare denoiser, first
        if adapter.layers is not None:
            from training import lora_formats

            layers = lora_formats.resolve(adapter.layers, base_module(model), f"LoRA adapter {adapter.path}")
            r, alpha, ranks, alphas = lora_formats.peft_patterns(layers)
            state = {f"{n}.lora_{ab}.weight": t for n, v in layers.items() for ab, t in (("A", v.down), ("B", v.up))}
            cfg = LoraAdapterConfig(rank=r, alpha=alpha)
            resolved[i] = (state, list(layers), peft_config(cfg, list(layers), ranks, alphas))
    for i, (adapter, _) in enumerate(adapters):
        name = f"adapter_{i}"
        if i in resolved:
            adapter = LoadedAdapter(adapter.path, resolved[i][0], adapter.config, resolved[i][1], adapter.meta)
        missing = [t for t in adapter.targets if t not in modules]
        if missing:
            raise ValueError(f"LoRA adapter {adapter.path}: adapts modules this denoiser does not have "
                             f"(e.g. {missing[:3]}); it was trained for a {adapter.meta.get('denoiser')} of "
                             "another architecture")
        if adapter.meta.get("base_sha256") not in (None, fingerprint):
            log.warning("LoRA adapter %s was trained on other base weights than these (fingerprints differ)",
                        adapter.path)
        config = resolved[i][2] if i in resolved else peft_config(adapter.config, adapter.targets)
        if wrapped is None:
            wrapped = get_peft_model(model, config, adapter_name=name)
        else:
            wrapped.add_adapter(name, config)
        result = set_peft_model_state_dict(wrapped, {PEFT_PREFIX + k: v for k, v in adapter.state.items()},
                                           adapter_name=name)
        unexpected = [k for k in result.unexpected_keys if is_adapter_name(k)]
        absent = [k for k in result.missing_keys if is_adapter_name(k) and f".{name}." in k]
        if unexpected or absent:
            raise ValueError(f"LoRA adapter {adapter.path}: tensors do not fit its own targets (unexpected "
                             f"{unexpected[:3]}, missing {absent[:3]})")
        names.append(name)
    assert wrapped is not None
    wrapped.base_model.set_adapter(names)
    set_adapter_scales(wrapped, {n: s for n, (_, s) in zip(names, adapters)})
    wrapped.requires_grad_(False)
    return wrapped.eval()


def set_adapter_scales(model: nn.Module, scales: dict[str, float]) -> None:
    """Scale adapter ``name``'s update to ``scale × (alpha / r)·BA`` (unmerged adapters only)."""
    for layer in lora_layers(model):
        if layer.merged:
            raise RuntimeError("set_adapter_scales: unmerge the adapters first (merged weights keep the old scale)")
        for name, scale in scales.items():
            layer.set_scale(name, scale)


def merge_adapters(model: nn.Module) -> None:
    """Fold the active adapters into the base weights: ``W ← W + Σ scale_i ΔW_i``."""
    as_peft(model).base_model.merge_adapter()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters` (``W ← W − Σ scale_i ΔW_i``, exact up to float rounding)."""
    as_peft(model).base_model.unmerge_adapter()


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base weights with the active adapters folded in, in the denoiser's own naming (fp32 copy; the model
    itself is left unmerged)."""
    import copy

    clone = copy.deepcopy(as_peft(model)).float()
    return {k: v.detach().cpu().contiguous() for k, v in clone.merge_and_unload().state_dict().items()}


__all__ = [
    "AdapterSpec", "LoadedAdapter", "LoraAdapterConfig", "TARGET_GROUPS", "adapter_state_dict", "adapters_disabled",
    "add_lora", "as_peft", "attach_adapters", "base_module", "base_state_dict", "cast_frozen_", "is_adapter_name",
    "load_adapter", "lora_layers", "lora_target_names", "merge_adapters", "merged_state_dict", "parameter_bytes",
    "peft_config", "save_adapter", "set_adapter_scales", "temporal_prefixes", "unmerge_adapters", "unwrap",
    "weights_fingerprint", "weights_fingerprints", "held_dtype",
]
