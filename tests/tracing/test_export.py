"""torch.export -> core ATen: views survive decomposition, and torch's failures are one CompileError line."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pockprop.errors import CompileError
from pockprop.tracing.trace import export


class Attention(nn.Module):
    """GPT-2's pattern: SDPA, then transpose/reshape and a `view` that is valid only for the layout of
    torch's SDPA kernel, not for the layout of its decomposition (pytorch/pytorch#136543)."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = (y.view(n, t, self.heads, -1).transpose(1, 2) for y in self.qkv(x).split(d, dim=2))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.reshape(n, -1, t, d // self.heads).transpose(1, 2).reshape(n, t, -1)
        return self.proj(a.view(-1, d)).view(n, t, d)


def _decomposes_and_matches(model: nn.Module, x: torch.Tensor) -> None:
    ep = export(model, (x,))
    with torch.no_grad():
        got, want = ep.module()(x), model(x)
    want = want.logits if hasattr(want, "logits") else want
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, want, rtol=1e-5, atol=1e-5)


def test_view_after_decomposed_sdpa() -> None:
    torch.manual_seed(0)
    _decomposes_and_matches(Attention(), torch.randn(2, 8, 32))


class _Logits(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(ids).logits


def test_gpt2_under_sdpa_exports() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    _decomposes_and_matches(_Logits(transformers.GPT2LMHeadModel(cfg)), torch.randint(0, 50, (2, 8)))


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_torch_failure_is_one_compile_error_line() -> None:
    with pytest.raises(CompileError) as info:
        export(DataDependent(), (torch.randn(2, 3),))
    msg = str(info.value)
    assert msg.startswith("torch.export could not trace the model: ") and "\n" not in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no torch traceback chained
