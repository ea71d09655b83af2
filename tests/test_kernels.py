"""vLLM's fused kernels (used by the sidecar's layers) against their plain-torch fallbacks, on the CPU build."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dispider_vllm import kernels
from dispider_vllm.decision.compact_lm import CompactLM
from dispider_vllm.perception.encoder import PerceptionEncoder
from dispider_vllm.perception.modules import PerceptionDecisionModules
from dispider_vllm.types import Clip

pytestmark = pytest.mark.skipif(not kernels.fused_ops_available(), reason="vLLM's compiled ops do not load")


def test_each_fused_kernel_matches_its_fallback():
    torch.manual_seed(0)
    x, residual, weight = torch.randn(3, 5, 64), torch.randn(3, 5, 64), torch.randn(64)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-6, fused=True),
                               kernels.rms_norm(x, weight, 1e-6, fused=False))
    fused = kernels.add_rms_norm(x.clone(), residual.clone(), weight, 1e-6, fused=True)
    plain = kernels.add_rms_norm(x, residual, weight, 1e-6, fused=False)
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want)
    gate_up = torch.randn(4, 2 * 48)
    torch.testing.assert_close(kernels.silu_and_mul(gate_up, fused=True), kernels.silu_and_mul(gate_up, fused=False))
    torch.testing.assert_close(kernels.quick_gelu(x, fused=True), kernels.quick_gelu(x, fused=False))


def test_rotary_in_place_on_strided_views_of_one_qkv_matmul():
    """q and k are column slices of the merged q/k/v output: the kernel must rotate them where they lie."""
    torch.manual_seed(0)
    head_dim, tokens = 16, 9
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    positions = torch.tensor([0, 1, 2, 3, 40, 41, 42, 7, 8])
    results = []
    for fused in (True, False):
        qkv = torch.randn(tokens, (4 + 2 + 2) * head_dim, generator=torch.Generator().manual_seed(1))
        q, k, v = qkv.split([4 * head_dim, 2 * head_dim, 2 * head_dim], dim=-1)
        kernels.Rotary(inv_freq, head_dim, torch.float32, fused=fused).apply_(positions, q, k)
        results.append(qkv)
    torch.testing.assert_close(results[0], results[1])
    untouched = torch.randn(tokens, 8 * head_dim, generator=torch.Generator().manual_seed(1))[:, 6 * head_dim :]
    torch.testing.assert_close(results[0][:, 6 * head_dim :], untouched)  # v is left alone
    assert not torch.equal(results[0][:, :head_dim], untouched[:, :head_dim])


def test_merged_linear_keeps_one_copy_of_the_weights_and_the_module_working():
    torch.manual_seed(0)
    owner = nn.Module()
    linears = [nn.Linear(8, rows) for rows in (8, 4, 4)]
    x = torch.randn(2, 8)
    before = [linear(x) for linear in linears]
    merged = kernels.merged_linear(owner, "_qkv", linears)
    assert kernels.merged_linear(owner, "_qkv", linears) is merged  # cached: a second caller shares it
    weight = merged.weight
    assert linears[1].weight.data_ptr() == weight[8:12].data_ptr()  # a view, not a copy
    for linear, want in zip(linears, before):
        torch.testing.assert_close(linear(x), want)
    torch.testing.assert_close(merged(x), torch.cat(before, dim=-1))


def test_encoder_agrees_with_and_without_fused_kernels(monkeypatch):
    modules = PerceptionDecisionModules.random(seed=3)
    clips = [Clip(index=i, start=16.0 * i, end=16.0 * (i + 1), pixels=torch.randn(16, 3, 224, 224)) for i in range(2)]
    fused = PerceptionEncoder(modules).encode(clips)
    monkeypatch.setenv("DISPIDER_FUSED_OPS", "0")
    assert not kernels.fused_ops_available()
    plain_lm = CompactLM(modules.language_model)
    assert not plain_lm.fused
    plain = PerceptionEncoder(modules, lm=plain_lm).encode(clips)
    for a, b in zip(fused, plain):
        for name in ("raw", "memory", "indicator"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-4, rtol=0)
