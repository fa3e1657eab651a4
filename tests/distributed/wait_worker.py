"""Run by ``tests/distributed/test_sharding_multiprocess.py`` as 2 ranks (gloo, CPU): rank 0 works for longer than
the process group's collective timeout inside :func:`training.sharding.wait_for_main_process` while rank 1 waits;
both then use the default group again. Each rank prints one JSON line."""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from training.sharding import wait_for_main_process  # noqa: E402

TIMEOUT_S = 1.0  # the default group's collective timeout
WORK_S = 3.0  # rank 0's work: longer than that


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    rank = dist.get_rank()
    start = time.monotonic()
    result = wait_for_main_process(lambda: time.sleep(WORK_S) or "encoded", hours=0.05)
    waited = time.monotonic() - start
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)  # the default group still works
    print(json.dumps({"rank": rank, "result": result, "waited_s": round(waited, 2), "sum": float(t)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
