"""The shared attention path: SDPA and the explicit-softmax reference agree, masks work, xformers fails clearly."""

import importlib.util

import pytest
import torch

from models.attention import Attention, AttentionBackendError, attention, check_backend, set_attention_backend
from models.conditioning import Conditioning
from models.dit import DiT, DiTConfig


def test_sdpa_matches_math_self_attention():
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), attention(q, k, v, backend="math"))


def test_sdpa_matches_math_masked_cross_attention():
    q = torch.randn(2, 3, 10, 8)
    k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    mask = torch.tensor([[True, True, False, False, False, False], [True] * 6])
    sdpa = attention(q, k, v, mask=mask, backend="sdpa")
    math = attention(q, k, v, mask=mask, backend="math")
    torch.testing.assert_close(sdpa, math)
    # Masked keys really are ignored: changing them changes nothing for sample 0, but does for sample 1.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 2:] += 5.0
    v2[:, :, 2:] -= 3.0
    moved = attention(q, k2, v2, mask=mask, backend="sdpa")
    torch.testing.assert_close(moved[0], sdpa[0])
    assert not torch.allclose(moved[1], sdpa[1])


def test_attention_module_backends_agree_with_mask():
    torch.manual_seed(1)
    module = Attention(16, context_dim=12, heads=4, qkv_bias=True, qk_norm=True)
    x, ctx = torch.randn(2, 7, 16), torch.randn(2, 5, 12)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    ref = module(x, context=ctx, mask=mask)
    module.backend = "math"
    torch.testing.assert_close(module(x, context=ctx, mask=mask), ref)


def test_dit_sdpa_and_math_backends_agree():
    config = DiTConfig(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                       context_dim=12)
    model = DiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 8, 8)
    cond = Conditioning(context=torch.randn(2, 5, 12), context_mask=torch.tensor([[1, 1, 0, 0, 0], [1] * 5]).bool())
    ref = model(x, torch.tensor([10, 700]), cond)
    set_attention_backend(model, "math")
    assert all(b.attn.backend == "math" and b.cross_attn.backend == "math" for b in model.blocks)
    torch.testing.assert_close(model(x, torch.tensor([10, 700]), cond), ref)


def test_xformers_unavailable_on_cpu_raises_clear_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(AttentionBackendError, match="xformers"):
        attention(q, q, q, backend="xformers")
    with pytest.raises(AttentionBackendError, match="xformers"):
        check_backend("xformers", torch.device("cpu"))
    # A DiT asking for xformers on CPU fails at construction (not installed) or at the first forward (not CUDA).
    config = DiTConfig(sample_size=8, hidden_size=32, depth=1, num_heads=2, attention_backend="xformers")
    with pytest.raises(AttentionBackendError, match="xformers"):
        DiT(config)(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(AttentionBackendError, match="not installed"):
            Attention(16, heads=2, backend="xformers")


def test_unknown_backend_rejected():
    with pytest.raises(AttentionBackendError, match="unknown"):
        check_backend("flash-v9")
    with pytest.raises(ValueError, match="attention_backend"):
        DiTConfig(attention_backend="flash-v9")
