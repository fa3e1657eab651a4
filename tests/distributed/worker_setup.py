"""What every multi-process training worker script of these tests does first, in one place."""

from __future__ import annotations

import logging
import os

import torch


def prepare_worker(device: str) -> None:
    """Quiet logging (DeepSpeed, Accelerate and torch at WARNING), no tokenizer threads, one torch thread per rank
    (two ranks share two cores), and on CUDA deterministic kernels (bit-identical resume needs them)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    if device == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
