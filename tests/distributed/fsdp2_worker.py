"""Run by ``tests/distributed/test_sharding_multiprocess.py`` under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Accelerate turns FSDP on only for GPUs, so this drives PyTorch's FSDP2 (``fully_shard``) directly and checks our
sharding helpers on it: a small DiT is sharded block by block (one parameter has 3 rows: uneven chunks 2 + 1), trained
for a few steps next to an unsharded copy fed the same batches, with an EMA over each rank's shards beside an EMA of
the unsharded copy. Rank 0 writes a JSON report (the test asserts on it):

* how each parameter is split (rows per rank),
* our gather of the live shards against ``get_model_state_dict(full_state_dict=True)`` and against the unsharded copy,
* the consolidated EMA (``EMA.full_state_dict``) against the unsharded EMA,
* ``EMA.load_full_state_dict`` giving each rank back exactly its shard, and ``shard_of(gather_full(x)) == x``,
* an evaluation copy built by ``materialize`` from the consolidated weights against the unsharded model's output.
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
from models.dit import DiT, DiTConfig  # noqa: E402
from training.ema import EMA  # noqa: E402
from training.sharding import gather_full, local_shard, materialize, meta_skeleton, shard_of  # noqa: E402


def fsdp_chunk(t: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of ``t`` as FSDP2 shards dim 0 (``torch.chunk``; trailing ranks may get none)."""
    parts = list(torch.chunk(t, world, dim=0))
    parts += [t[:0]] * (world - len(parts))
    return parts[rank]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    return max(float((a[k].float().cpu() - b[k].float().cpu()).abs().max()) for k in a)


def main() -> None:
    report_path = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = DiT(DiTConfig(sample_size=8, patch_size=1, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10))
    reference = copy.deepcopy(model)  # unsharded, trained on the same batches
    skeleton = meta_skeleton(model)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    split = {name: [int(local_shard(p).shape[0]), int(p.shape[0])] for name, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    ema = EMA(model.named_parameters(), decay=0.7, warmup=False)
    ema_ref = EMA(reference.named_parameters(), decay=0.7, warmup=False)
    g = torch.Generator().manual_seed(5)  # same batches on every rank: FSDP's mean gradient = the reference's
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        cond = Conditioning(class_labels=torch.randint(0, 10, (4,), generator=g))
        for net, o in ((model, opt), (reference, opt_ref)):
            loss = (net(x, t, cond) - x).pow(2).mean()
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
        ema.update()
        ema_ref.update()
    if not ema.tracks(model.named_parameters()):  # the pairs resolved before FSDP2's lazy init still hold
        raise RuntimeError("FSDP2 replaced the parameter objects the EMA was built on")

    live_mine = {n: gather_full(p, local_shard(p).detach(), dst=0) for n, p in model.named_parameters()}
    live_torch = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema_full = ema.full_state_dict(dst=0)

    # round trips on every rank: whole → this rank's part, and part → whole → part
    restored = EMA(model.named_parameters(), decay=0.7, warmup=False)
    restored.load_full_state_dict(ema_ref.state_dict())
    own_part_ok = all(
        torch.equal(restored.shadow[n], fsdp_chunk(ema_ref.shadow[n], world, rank))
        for n in restored.shadow
    )
    round_trip_ok = True
    for _, p in model.named_parameters():
        local = local_shard(p).detach()
        whole = gather_full(p, local, dst=None)
        round_trip_ok &= torch.equal(shard_of(p, whole), local)

    report = {"world": world, "split": split, "own_part_ok": own_part_ok}
    flags = torch.tensor([float(own_part_ok), float(round_trip_ok)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if rank == 0:
        ref_live = {n: p.detach() for n, p in reference.named_parameters()}
        evaluation = materialize(skeleton, live_torch, "cpu")
        reference.eval()
        x = torch.randn(2, 3, 8, 8, generator=g)
        cond = Conditioning(class_labels=torch.tensor([1, 2]))
        t = torch.tensor([10, 500])
        with torch.no_grad():
            out_eval, out_ref = evaluation(x, t, cond), reference(x, t, cond)
        report.update({
            "all_ranks_own_part_ok": bool(flags[0]), "all_ranks_round_trip_ok": bool(flags[1]),
            "gather_vs_torch_full_state_dict": max_diff(live_mine, {k: v for k, v in live_torch.items()}),
            "gather_vs_unsharded_model": max_diff(live_mine, ref_live),
            "ema_vs_unsharded_ema": max_diff({k: v for k, v in ema_full.items() if k != "num_updates"},
                                             {k: v for k, v in ema_ref.state_dict().items() if k != "num_updates"}),
            "ema_num_updates": int(ema_full["num_updates"]),
            "eval_copy_vs_unsharded_output": float((out_eval - out_ref).abs().max()),
            "eval_copy_dtype": str(next(evaluation.parameters()).dtype),
            "eval_copy_requires_grad": any(p.requires_grad for p in evaluation.parameters()),
        })
        Path(report_path).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
