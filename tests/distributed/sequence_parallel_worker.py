"""Run by ``tests/distributed/test_sequence_parallel.py`` as ``world`` ranks (gloo, CPU): the video DiT split over
the ranks by Ulysses sequence parallelism (:mod:`training.sequence_parallel`) against the same model in one piece.

Every rank builds the same models (fixed seed, every weight drawn at random: DiT's adaLN-Zero initialisation would
make the output exactly zero) and the same inputs, runs the reference (no parallelism) itself, then the split model,
and compares outputs, the loss and the gradients after the mean over all ranks that DDP takes. Cases:

* ``sp=world`` on clips whose token count divides by the group and on clips whose count does not (padding), for a
  Wan-shaped DiT (3-D RoPE only, q/k norms across heads, zero-padded text) and a Latte-style one (sin-cos table
  plus RoPE, masked text, tubelets, gradient checkpointing);
* with 4 ranks also ``sp=2`` × 2 data-parallel ranks: each data-parallel pair gets its own clips, and the mean gradient
  must be the mean of the two clips' whole gradients.

Writes ``{out}/rank{r}.json`` with the largest deviations per case; the test asserts on them.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.conditioning import Conditioning  # noqa: E402
from models.dit import DiT, DiTConfig, wan_config  # noqa: E402
from training.sequence_parallel import (  # noqa: E402
    attach_sequence_parallel,
    data_parallel_position,
    detach_sequence_parallel,
    sequence_parallel_group,
)

TEXT = 16  # text width of the tiny models
CONFIGS = {
    # Wan 2.1's structure: Conv3d patches (1, 2, 2), 3-D RoPE only, q/k RMS norms across heads, adaLN-single
    "wan": wan_config(num_heads=4, mlp_hidden_size=48, depth=2, head_dim=8, text_dim=TEXT),
    # sin-cos table + RoPE, per-head q/k norms, masked text, 2-frame tubelets, activation checkpointing
    "latte_full": DiTConfig(sample_size=8, patch_size=2, patch_size_t=2, in_channels=4, hidden_size=32, depth=2,
                            num_heads=4, context_dim=TEXT, caption_projection=True, qk_norm=True, video=True,
                            rope=True, gradient_checkpointing=True),
}
# (frames, height, width) of the latent clips: 5·4·4 = 80 tokens divide by 2 and 4; 3·3·3 = 27 tokens do not
SHAPES = {"divisible": (5, 8, 8), "padded": (3, 6, 6)}


def build(config: DiTConfig) -> DiT:
    torch.manual_seed(0)
    model = DiT(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def inputs(config: DiTConfig, shape: tuple[int, int, int], seed: int, batch: int = 2):
    frames, h, w = shape
    frames *= config.patch_size_t
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, frames, h, w, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, 5, TEXT, generator=g, dtype=torch.float64)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False
    target = torch.randn(batch, config.model_out_channels, frames, h, w, generator=g, dtype=torch.float64)
    return x, t, Conditioning(context=context, context_mask=mask), target


def loss_and_grads(model: DiT, x, t, cond, target):
    model.zero_grad(set_to_none=True)
    out = model(x, t, cond)
    loss = ((out - target) ** 2).mean()
    loss.backward()
    return out.detach(), loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def max_dev(a: dict, b: dict) -> tuple[float, float]:
    """Largest absolute deviation over all tensors and the largest magnitude in ``b`` (for a relative reading)."""
    return (max(float((a[k] - b[k]).abs().max()) for k in b), max(float(b[k].abs().max()) for k in b))


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict = {"rank": rank, "world": world, "cases": {}}
    layouts = [(world, None)] + ([(2, "dp")] if world == 4 else [])
    for sp, dp_tag in layouts:
        dp_rank, dp_world = data_parallel_position(rank, world, sp)
        group = sequence_parallel_group(sp) if sp != world else dist.group.WORLD
        for name, config in CONFIGS.items():
            reference = build(config)
            split = copy.deepcopy(reference)
            shard = attach_sequence_parallel(split, sp, group=group)
            for shape_name, shape in SHAPES.items():
                case = f"{name}/{shape_name}/sp{sp}" + (f"x{dp_world}dp" if dp_tag else "")
                x, t, cond, target = inputs(config, shape, seed=10 + dp_rank)
                out_ref, loss_ref, grads_ref = loss_and_grads(reference, x, t, cond, target)
                if dp_world > 1:  # the whole gradient averaged over the data-parallel ranks, as DDP makes it
                    for g in grads_ref.values():
                        dist.all_reduce(g)
                        g /= world  # each clip's gradient is held by sp ranks
                out, loss, grads = loss_and_grads(split, x, t, cond, target)
                for g in grads.values():  # what DDP / ZeRO / FSDP do: the mean over every rank of the world
                    dist.all_reduce(g)
                    g /= world
                gathered = [torch.empty_like(loss) for _ in range(world)]
                dist.all_gather(gathered, loss)
                grad_dev, grad_scale = max_dev(grads, grads_ref)
                report["cases"][case] = {
                    "tokens": shard.tokens, "padded": shard.padded, "local_tokens": shard.local_tokens,
                    "out_dev": float((out - out_ref).abs().max()), "out_max": float(out_ref.abs().max()),
                    "loss_dev": float((loss - loss_ref).abs()),
                    "group_losses": [float(v) for v in gathered[rank - rank % sp: rank - rank % sp + sp]],
                    "grad_dev": grad_dev, "grad_max": grad_scale,
                    "grads_nonzero": sum(int(g.abs().max() > 0) for g in grads_ref.values()),
                    "n_params": len(grads_ref),
                }
            detach_sequence_parallel(split)
            with torch.no_grad():  # detached: one process's model again, on every rank alone
                out_detached = split(x, t, cond)
                report["cases"][f"{name}/detached/sp{sp}"] = {
                    "out_dev": float((out_detached - reference(x, t, cond)).abs().max())}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
