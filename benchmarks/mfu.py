"""Model FLOPs utilisation of training through latentloom's Trainer, beside facebookresearch/DiT's training loop.

For each model: images/s of training steps (AdamW, gradient clipping at 1.0, EMA) on pre-made random latents
already on the device (so data loading is not measured: the latents of a cached run), and

    MFU = images/s × 3 × forward FLOPs per image / the card's dense bf16 peak

(forward FLOPs counted on the meta device by :func:`models.flops.count_flops`, 2 per multiply-accumulate; × 3 for
forward + backward, the usual convention — activation recomputation is not counted as useful work).

Models: ``dit-xl2`` (DiT-XL/2, class-conditional, 256 px = 32×32×4 latents, learned sigma), ``dit-xl2-text``
(DiT-XL/2 with cross-attention to 77 random 1024-wide text states, adaLN-single), ``unet-sd15`` (the Stable
Diffusion 1.5 U-Net at 512 px = 64×64×4 latents, 77×768 text states).

The reference (``--reference-dir PATH``, a clone of https://github.com/facebookresearch/DiT, kept outside this
project): its ``models.py`` (``DiT_models``) and ``diffusion`` package are imported from there at run time and its
``train.py`` loop is run as published — ``diffusion.training_losses`` (MSE + the learned-variance VLB term), then
``zero_grad``, ``backward``, ``AdamW(lr=1e-4, weight_decay=0).step()``, its ``update_ema`` (imported from its
``train.py`` when that imports here — it needs torchvision and diffusers — else the same per-parameter
``mul_/add_`` written here) and the per-step ``loss.item()`` — on the same latents and batch, once as published
(fp32 with TF32 matmuls, what its train.py sets) and once under a bf16 autocast (our precision). The published
loop neither clips nor uses a fused optimizer. ``ours / reference`` is the headline.

    python benchmarks/mfu.py --reference-dir ~/DiT                    # on a GPU: the three models + the reference
    python benchmarks/mfu.py --models dit-xl2 --batch 256 --steps 30
    python benchmarks/mfu.py --cpu-tiny [--reference-dir ~/DiT]       # tiny models end to end on the CPU (CI)

Prints one table row per run (model, loop, precision, batch, images/s, TFLOP/s, MFU, ratio to the reference) and,
with ``--json PATH``, writes the rows there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipeline.memory import InMemoryLoader  # noqa: E402
from models.conditioning import Conditioning  # noqa: E402
from models.dit import DiT, DiTConfig, dit_class_conditional, dit_text_conditional  # noqa: E402
from models.flops import count_flops  # noqa: E402
from models.unet import UNet, UNetConfig, sd15_unet_config  # noqa: E402
from training.diffusion import DiffusionConfig  # noqa: E402
from training.diffusion.process import build_process  # noqa: E402
from training.stages.base import Stage  # noqa: E402
from training.trainer import OptimConfig, TrainConfig, Trainer  # noqa: E402

PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peak (no sparsity), by a name fragment of torch.cuda.get_device_name()
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card's is 756
    "A100": 312.0,
}


def peak_tflops(device_name: str) -> Optional[float]:
    """The card's dense bf16 peak (TFLOP/s) from :data:`PEAK_BF16_TFLOPS`, or None for an unknown card / the CPU."""
    if "H100" in device_name and "PCIe" in device_name:
        return 756.0
    for fragment, peak in PEAK_BF16_TFLOPS.items():
        if fragment in device_name:
            return peak
    return None


# ------------------------------------------------------------------------------------------------ models


@dataclass
class Spec:
    """One benchmarked model: how to build it and its inputs."""

    name: str
    build: Any  # () -> nn.Module
    side: int  # latent side (latents are 4 × side × side)
    text: Optional[tuple[int, int]] = None  # (tokens, width) of the random text states; None: class-conditional
    classes: int = 0  # class-conditional: number of classes
    reference: Optional[str] = None  # the reference's DiT_models key (or "tiny"), where there is one


def specs(tiny: bool) -> dict[str, Spec]:
    if tiny:
        dit = DiTConfig(sample_size=8, patch_size=2, in_channels=4, learn_sigma=True, hidden_size=64, depth=2,
                        num_heads=2, num_classes=10)
        dit_text = DiTConfig(sample_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                             context_dim=32, caption_projection=True, adaln_single=True)
        unet = UNetConfig(block_out_channels=[32, 64], layers_per_block=1, attention_levels=[True, False],
                          transformer_depth=[1, 1], num_heads=[2, 2], cross_attention_dim=32, norm_num_groups=8)
        return {
            "dit-xl2": Spec("dit-tiny", lambda: DiT(dit), 8, classes=10, reference="tiny"),
            "dit-xl2-text": Spec("dit-tiny-text", lambda: DiT(dit_text), 8, text=(8, 32)),
            "unet-sd15": Spec("unet-tiny", lambda: UNet(unet), 8, text=(8, 32)),
        }
    return {
        "dit-xl2": Spec("DiT-XL/2", lambda: DiT(dit_class_conditional("XL", 2)), 32, classes=1000,
                        reference="DiT-XL/2"),
        "dit-xl2-text": Spec("DiT-XL/2-text", lambda: DiT(dit_text_conditional("XL", 2)), 32, text=(77, 1024)),
        "unet-sd15": Spec("SD1.5 U-Net 512px", lambda: UNet(sd15_unet_config()), 64, text=(77, 768)),
    }


class LatentBatch:
    """Pre-made latents with class labels or text states (already on the device: ``to`` is then free)."""

    def __init__(self, latents: Tensor, labels: Optional[Tensor], context: Optional[Tensor]):
        self.latents, self.labels, self.context = latents, labels, context

    def to(self, device: Any) -> "LatentBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return LatentBatch(move(self.latents), move(self.labels), move(self.context))

    def __len__(self) -> int:
        return self.latents.shape[0]

    def conditioning(self) -> Conditioning:
        if self.context is not None:
            return Conditioning(context=self.context)
        return Conditioning(class_labels=self.labels)


def make_batches(spec: Spec, batch: int, n: int, device: torch.device) -> list[LatentBatch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 4, spec.side, spec.side, generator=g)
        y = torch.randint(0, max(spec.classes, 1), (batch,), generator=g) if spec.classes else None
        c = torch.randn(batch, *spec.text, generator=g) if spec.text else None
        out.append(LatentBatch(x, y, c).to(device))
    return out


class LatentDiffusionStage(Stage):
    """The benchmark's stage: the denoising loss (DDPM, ε-prediction, linear β as DiT) of ``model`` on a
    :class:`LatentBatch`; a learned-sigma model's variance channels are left out of the loss."""

    name = "mfu"

    def __init__(self, model: nn.Module):
        self.model = model
        self.process = build_process(DiffusionConfig(kind="discrete", schedule="linear", prediction="epsilon"))

    def trainable(self) -> nn.Module:
        return self.model

    def loss(self, model: nn.Module, batch: LatentBatch) -> tuple[Tensor, dict[str, Any]]:
        terms = self.process.training_loss_terms(batch.latents)
        out = model(terms.x_t, terms.timesteps, batch.conditioning())  # (B, C or 2C, h, w)
        if out.shape[1] != batch.latents.shape[1]:
            out = DiT.split_learned_sigma(out)[0]
        return self.process.loss(out.float(), terms), {}


def forward_flops(model: nn.Module, sample: LatentBatch) -> float:
    """Forward FLOPs per image, counted on the meta device."""
    x = sample.latents[:1]
    t = torch.zeros(1, dtype=torch.long)
    cond = LatentBatch(x, None if sample.labels is None else sample.labels[:1],
                       None if sample.context is None else sample.context[:1]).conditioning()
    return float(count_flops(model, x, t, cond))


# ------------------------------------------------------------------------------------------------- timing


class _TimedTrainer(Trainer):
    """Our Trainer, timestamping the end of step ``warmup`` and of the last step (after the device finishes), with
    the checkpoint writes left out (a benchmark of steps, not of disk)."""

    def __init__(self, *args: Any, warmup: int, **kw: Any):
        super().__init__(*args, **kw)
        self.warmup, self.marks = warmup, {}

    def _end_of_step(self, state: Any, logs: Any, stop: Any) -> bool:
        out = super()._end_of_step(state, logs, stop)
        if state.step in (self.warmup, self.cfg.max_steps):
            _sync(self.accelerator.device)
            self.marks[state.step] = time.perf_counter()
        return out

    def _save(self, state: Any) -> None:
        self._read_window(state)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(spec: Spec, batches: list[LatentBatch], steps: int, warmup: int, device: torch.device,
             compile_mode: str, optim_impl: str) -> float:
    """Images/s of our Trainer (AdamW, clipping 1.0, EMA 0.9999; bf16 on a GPU)."""
    torch.manual_seed(0)
    model = spec.build()
    cfg = TrainConfig(max_steps=warmup + steps, log_every=max(1, steps), checkpoint_every=10**9, resume="none",
                      progress=False, cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda"
                      else "no", compile=compile_mode, ema_decay=0.9999,
                      optim=OptimConfig(lr=1e-4, max_grad_norm=1.0, implementation=optim_impl))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _TimedTrainer(cfg, LatentDiffusionStage(model), InMemoryLoader(batches), Path(tmp),
                                micro_batch_size=len(batches[0]), warmup=warmup)
        trainer.fit()
    seconds = trainer.marks[warmup + steps] - trainer.marks[warmup]
    return steps * len(batches[0]) / seconds


def _reference_modules(reference_dir: Path) -> tuple[Any, Any, Any, str]:
    """(DiT_models, create_diffusion, update_ema, where update_ema came from) imported from the DiT clone."""
    if not (reference_dir / "models.py").is_file() or not (reference_dir / "diffusion").is_dir():
        raise SystemExit(f"--reference-dir {reference_dir}: not a facebookresearch/DiT clone (needs models.py and "
                         "diffusion/)")
    sys.path.insert(0, str(reference_dir))
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "models" or k.startswith("models.")
             or k == "diffusion" or k.startswith("diffusion.")}  # our own "models" package has the same name
    try:
        import importlib

        ref_models = importlib.import_module("models")
        ref_diffusion = importlib.import_module("diffusion")
        try:
            ref_train = importlib.import_module("train")
            update_ema, origin = ref_train.update_ema, "its train.py"
        except Exception as err:  # its train.py imports torchvision and diffusers at the top
            update_ema, origin = _update_ema_as_published, f"re-stated here ({type(err).__name__}: {err})"
        return ref_models.DiT_models, ref_diffusion.create_diffusion, update_ema, origin
    finally:
        for k in [k for k in sys.modules if k in ("models", "diffusion", "train") or k.startswith(("models.",
                                                                                                  "diffusion."))]:
            sys.modules.pop(k)
        sys.modules.update(saved)
        sys.path.remove(str(reference_dir))


@torch.no_grad()
def _update_ema_as_published(ema_model: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """DiT train.py's EMA step: every parameter (frozen or not) as ``e = decay·e + (1 − decay)·p``, one by one."""
    ema = OrderedDict(ema_model.named_parameters())
    for name, p in model.named_parameters():
        ema[name].mul_(decay).add_(p.data, alpha=1 - decay)


def run_reference(spec: Spec, batches: list[LatentBatch], steps: int, warmup: int, device: torch.device,
                  reference_dir: Path, bf16: bool) -> tuple[float, float, str]:
    """Images/s of DiT's published train.py loop (its model, diffusion, optimizer, EMA) on the same latents;
    also its model's forward FLOPs per image and where its update_ema came from."""
    dit_models, create_diffusion, update_ema, origin = _reference_modules(reference_dir)
    torch.manual_seed(0)
    if spec.reference == "tiny":
        ctor = dit_models["DiT-S/2"].__globals__["DiT"]
        model = ctor(input_size=spec.side, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                     num_classes=spec.classes)
    else:
        model = dit_models[spec.reference](input_size=spec.side, num_classes=spec.classes)
    model = model.to(device)
    flops = float(count_flops(model, batches[0].latents[:1].cpu(), torch.zeros(1, dtype=torch.long),
                              batches[0].labels[:1].cpu()))
    ema = copy.deepcopy(model).to(device)
    for p in ema.parameters():
        p.requires_grad_(False)
    diffusion = create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    update_ema(ema, model, decay=0)
    model.train()
    ema.eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # restored afterwards
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # what its train.py sets
    try:
        return _reference_loop(model, ema, diffusion, opt, update_ema, batches, steps, warmup, device, bf16) + \
            (flops, origin)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _reference_loop(model: nn.Module, ema: nn.Module, diffusion: Any, opt: Any, update_ema: Any,
                    batches: list[LatentBatch], steps: int, warmup: int, device: torch.device,
                    bf16: bool) -> tuple[float]:
    """DiT train.py's inner loop (images/s,), minus the VAE encoding (the latents are pre-made)."""
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    running_loss, marks = 0.0, {}
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        x, y = b.latents, b.labels
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        with amp:
            loss_dict = diffusion.training_losses(model, x, t, dict(y=y))
        loss = loss_dict["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model)
        running_loss += loss.item()
        if i + 1 in (warmup, warmup + steps):
            _sync(device)
            marks[i + 1] = time.perf_counter()
    return (steps * len(batches[0]) / (marks[warmup + steps] - marks[warmup]),)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="dit-xl2,dit-xl2-text,unet-sd15",
                        help="comma-separated: dit-xl2, dit-xl2-text, unet-sd15")
    parser.add_argument("--batch", type=int, default=None, help="per-step batch (default 64 DiT / 16 U-Net; 4 tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 tiny)")
    parser.add_argument("--reference-dir", type=Path, default=None,
                        help="a clone of facebookresearch/DiT: run its train.py loop beside ours (DiT-XL/2 row)")
    parser.add_argument("--cpu-tiny", action="store_true", help="tiny models on the CPU, end to end (CI)")
    parser.add_argument("--compile", default="none", choices=["none", "blocks"], help="ours: train.compile")
    parser.add_argument("--optim", default="auto", choices=["auto", "fused", "foreach", "for_loop"],
                        help="ours: optim.implementation")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.cpu_tiny:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("mfu.py: no CUDA device; run with --cpu-tiny on the CPU")
    if args.reference_dir is not None and not ((args.reference_dir / "models.py").is_file()
                                               and (args.reference_dir / "diffusion").is_dir()):
        raise SystemExit(f"--reference-dir {args.reference_dir}: not a facebookresearch/DiT clone (needs models.py "
                         "and diffusion/)")
    tiny = args.cpu_tiny
    table = specs(tiny)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in table]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(table)}")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_tflops(card) if device.type == "cuda" else None
    print(f"device: {card}; dense bf16 peak: {f'{peak:g} TFLOP/s' if peak else 'n/a (MFU not computed)'}; "
          f"torch {torch.__version__}", flush=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        spec = table[name]
        batch = args.batch or (4 if tiny else (16 if name == "unet-sd15" else 64))
        steps, warmup = args.steps or (3 if tiny else 20), args.warmup or (1 if tiny else 5)
        gc.collect()  # the previous model's trainer, optimizer and EMA
        if device.type == "cuda":
            torch.cuda.empty_cache()
        batches = make_batches(spec, batch, 4, device)
        torch.manual_seed(0)
        flops = forward_flops(spec.build(), batches[0])

        def row(loop: str, precision: str, ips: float, fwd: float, note: str = "", spec: Spec = spec,
                batch: int = batch) -> dict[str, Any]:
            tflops = ips * 3 * fwd / 1e12
            r = {"model": spec.name, "loop": loop, "precision": precision, "batch": batch, "images_per_s": ips,
                 "fwd_gflops_per_image": fwd / 1e9, "tflops": tflops, "mfu": tflops / peak if peak else None,
                 "device": card, "note": note}
            rows.append(r)
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"| {spec.name} | {loop} | {precision} | {batch} | {ips:.1f} | {tflops:.2f} | {mfu} |{note}",
                  flush=True)
            return r

        precision = "bf16" if device.type == "cuda" else "fp32"
        ours = row("latentloom Trainer", precision + (", compiled blocks" if args.compile == "blocks" else ""),
                   run_ours(spec, batches, steps, warmup, device, args.compile, args.optim), flops)
        if args.reference_dir is not None and spec.reference is not None:
            for bf16 in ((False, True) if device.type == "cuda" else (False,)):
                gc.collect()
                ips, ref_flops, origin = run_reference(spec, batches, steps, warmup, device, args.reference_dir,
                                                       bf16)
                ref = row("DiT train.py (reference)", "bf16 autocast" if bf16 else
                          ("fp32/TF32 as published" if device.type == "cuda" else "fp32"), ips, ref_flops,
                          f" update_ema from {origin}")
                ratio = ours["images_per_s"] / ref["images_per_s"]
                ref["ours_over_reference"] = ratio
                print(f"  ours / reference ({ref['precision']}): {ratio:.2f}x", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
