"""Memory per rank of Ulysses sequence parallelism (``parallel.sequence_parallel``) for a long clip: 129 frames at
256×256.

    python benchmarks/sequence_parallel_memory.py [--ranks 1 2 4] [--depth 2] [--width 384] [--heads 12]

The clip's latents come from the real autoencoder configs (built on the meta device, nothing is encoded): the
Wan-style causal 3-D VAE (4× time, 8× space: 129 frames → 33×32×32×16) and the frame-by-frame SVD VAE
(129×32×32×4); a Wan-shaped DiT with patch (1, 2, 2) makes 8,448 and 33,024 tokens of them.

(a) **Measured on the CPU** (gloo, the real Ulysses code, ``--ranks`` processes each): a Wan-shaped DiT of reduced
    width and depth (``--width``, ``--heads``, ``--depth``; Wan 2.1's MLP ratio 8960/1536 and 512 text tokens of
    width 4096) runs one forward and backward on the Wan-VAE clip (8,448 tokens, batch 1, fp32). Per rank:
    the bytes autograd saves for backward (activations: every saved tensor's storage counted once, parameters
    excluded), the peak resident-memory increase over the step (``VmHWM`` after ``clear_refs``, minus the RSS before
    it: activations, gradients, attention workspaces, the all-to-all buffers, allocator slack) and the step's time.

(b) **Estimated for Wan2.1-T2V-1.3B** (width 1536, 12 heads, 30 blocks) from CPU measurements: with a flash-type
    attention kernel (PyTorch's CPU SDPA and the GPU's flash/cuDNN kernels save q, k, v, the output and one
    log-sum-exp per query and head, never the N×N matrix) every activation a block saves is proportional to the
    tokens it holds, and under Ulysses a rank's attention holds ``H/P`` heads of all ``N`` tokens, as many
    elements as ``H`` heads of ``N/P`` tokens. So per rank: ``depth × (bytes per token per block) × ⌈N/P⌉ +
    (bytes per token outside the blocks) × N`` (the patch embedding and the gathered output are not split). The two
    per-token figures (and the per-block text keys/values, which are not split) are fitted exactly from the
    full-width model's saved bytes at depth 1 and 2 on clips of 256 and 512 tokens (CPU, one process, forward
    only). fp32; bf16 autocast roughly halves them. The model
    states (fp32 weights, gradients, AdamW moments: 16 bytes per parameter) are listed apart: whole on every rank
    under DDP, divided by the world size under ZeRO-3 / FSDP2.

(a) checks the premise of (b): the measured per-rank activations fall as 1/P.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.conditioning import Conditioning  # noqa: E402
from models.dit import DiT, wan_config  # noqa: E402

FRAMES, SIZE = 129, 256  # the clip
TEXT_TOKENS, TEXT_DIM = 512, 4096  # umT5 states, zero-padded to 512 (Wan)
WAN_MLP_RATIO = 8960 / 1536  # Wan 2.1 1.3B's ffn_dim / dim
MB = 2**20


def clip_latents() -> dict[str, tuple[int, ...]]:
    """(C, T, h, w) latents of the 129×256×256 clip under the Wan causal VAE and the frame-by-frame SVD VAE."""
    from models.video_autoencoder import (
        CausalAutoencoder3D,
        TemporalDecoderAutoencoder,
        svd_vae_config,
        wan_vae_config,
    )

    with torch.device("meta"):
        return {"wan-vae": tuple(CausalAutoencoder3D(wan_vae_config()).latent_shape(SIZE, SIZE, FRAMES)),
                "frame-vae": tuple(TemporalDecoderAutoencoder(svd_vae_config()).latent_shape(SIZE, SIZE, FRAMES))}


def reduced_config(width: int, heads: int, depth: int, in_channels: int = 16):
    return wan_config(num_heads=heads, head_dim=width // heads, mlp_hidden_size=int(round(width * WAN_MLP_RATIO)),
                      depth=depth, in_channels=in_channels, text_dim=TEXT_DIM)


def tokens_of(latent: tuple[int, ...], patch: int = 2) -> int:
    _, t, h, w = latent
    return t * (h // patch) * (w // patch)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def step_memory(model: DiT, latent: tuple[int, ...], seed: int = 0, backward: bool = True) -> dict[str, float]:
    """One forward (+ backward) of ``model`` on a batch of one ``latent`` clip: saved activation bytes (unique
    storages, parameters excluded), peak RSS increase, seconds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *latent, generator=g)
    cond = Conditioning(context=torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    gc.collect()
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, torch.tensor([500]), cond)
    saved = sum(seen.values())
    if backward:
        out.float().square().mean().backward()
    seconds = time.perf_counter() - start
    peak = _rss("VmHWM") - before
    return {"saved_mb": saved / MB, "peak_rss_mb": peak / MB, "seconds": seconds}


# --------------------------------------------------------------------------------------- (a) measured, gloo


def worker(out_dir: Path, width: int, heads: int, depth: int) -> None:
    import torch.distributed as dist

    from training.sequence_parallel import attach_sequence_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    latent = clip_latents()["wan-vae"]
    torch.manual_seed(0)
    model = DiT(reduced_config(width, heads, depth, latent[0]))
    if world > 1:
        attach_sequence_parallel(model, world, group=dist.group.WORLD)
    result = step_memory(model, latent)
    result.update(rank=rank, world=world, tokens=tokens_of(latent),
                  local_tokens=model.sequence_shard.local_tokens if world > 1 else tokens_of(latent))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(world: int, args: argparse.Namespace, out_dir: Path) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(out_dir), "--width", str(args.width),
                                       "--heads", str(args.heads), "--depth", str(args.depth)], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed (exit codes {codes})")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


# ------------------------------------------------------------------------------------- (b) full-size estimate


def saved_bytes_model(width: int, heads: int) -> tuple[float, float, float, float]:
    """The full-width Wan-shaped DiT's activation bytes (fp32, one process, forward only) as
    ``depth · (a·n + c) + o·n + e`` for ``n`` tokens: ``a`` per token per block, ``c`` per block (the text keys and
    values of cross-attention, not split), ``o`` per token outside the blocks, ``e`` outside and constant (the caption
    MLP). Fitted exactly from depth 1 and 2 on clips of 1 and 2 latent frames of 32×32 (256 and 512 tokens)."""
    saved = {}
    for frames in (1, 2):
        for depth in (1, 2):
            torch.manual_seed(0)
            model = DiT(reduced_config(width, heads, depth))
            saved[frames, depth] = step_memory(model, (16, frames, 32, 32), backward=False)["saved_mb"] * MB
            del model
    n1, n2 = tokens_of((16, 1, 32, 32)), tokens_of((16, 2, 32, 32))
    block = {n: saved[f, 2] - saved[f, 1] for f, n in ((1, n1), (2, n2))}
    outside = {n: saved[f, 1] - block[n] for f, n in ((1, n1), (2, n2))}
    a = (block[n2] - block[n1]) / (n2 - n1)
    o = (outside[n2] - outside[n1]) / (n2 - n1)
    return a, block[n1] - a * n1, o, outside[n1] - o * n1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--width", type=int, default=384, help="width of the measured reduced model")
    parser.add_argument("--heads", type=int, default=12, help="heads of the measured model (÷ each rank count)")
    parser.add_argument("--depth", type=int, default=2, help="blocks of the measured reduced model")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.width, args.heads, args.depth)
        return
    bad = [p for p in args.ranks if args.heads % p]
    if bad:
        raise SystemExit(f"--heads {args.heads} is not divisible by --ranks {bad}")

    latents = clip_latents()
    print(f"clip: {FRAMES} frames at {SIZE}×{SIZE}; latents (C, T, h, w): "
          + ", ".join(f"{k} {v} → {tokens_of(v)} tokens" for k, v in latents.items()))

    cfg = reduced_config(args.width, args.heads, args.depth)
    n_params = sum(p.numel() for p in DiT(cfg).parameters())
    print(f"\n(a) measured, CPU, gloo: Wan-shaped DiT width {args.width}, {args.heads} heads, depth {args.depth} "
          f"({n_params / 1e6:.1f} M parameters), wan-vae clip, batch 1, fp32, one forward + backward")
    print("| ranks | tokens per rank | saved activations per rank (MB) | × of 1 rank | peak RSS increase per rank (MB) "
          "| step (s) |")
    print("|---|---|---|---|---|---|")
    base = None
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            reports = launch(world, args, Path(tmp))
        saved = max(r["saved_mb"] for r in reports)
        base = saved if base is None and world == 1 else base
        ratio = f"{saved / base:.3f}" if base else "-"
        print(f"| {world} | {reports[0]['local_tokens']} | {saved:.1f} | {ratio} | "
              f"{max(r['peak_rss_mb'] for r in reports):.1f} | {max(r['seconds'] for r in reports):.1f} |", flush=True)

    width, heads, depth, params = 1536, 12, 30, 1_418_996_800  # Wan2.1-T2V-1.3B (models.dit WAN_SIZES)
    a, c, o, e = saved_bytes_model(width, heads)
    print(f"\n(b) estimate, Wan2.1-T2V-1.3B (width {width}, {heads} heads, {depth} blocks), batch 1, fp32 activations "
          f"measured on the CPU: {a / 1024:.1f} KiB per token per block + {c / MB:.1f} MiB per block (text keys and "
          f"values), {o / 1024:.1f} KiB per token + {e / MB:.1f} MiB outside the blocks; model states 16 B/parameter "
          f"= {16 * params / 2**30:.1f} GiB (whole per rank under DDP, ÷ world under ZeRO-3/FSDP2)")
    print("| latents (C, T, h, w) | tokens | ranks | tokens per rank | activations per rank (GiB) | × of 1 rank |")
    print("|---|---|---|---|---|---|")
    for name, latent in latents.items():
        n = tokens_of(latent)
        one = None
        for world in args.ranks:
            local = math.ceil(n / world)
            total = depth * (a * local + c) + o * n + e
            one = total if world == 1 else one
            ratio = f"{total / one:.3f}" if one else "-"
            print(f"| {name} {latent} | {n} | {world} | {local} | {total / 2**30:.2f} | {ratio} |")

if __name__ == "__main__":
    main()
