"""FP8 linears for the sidecar (``--sidecar-quantization fp8``), on the CPU build's FP8 matmul.

The numerics change, so these bound how much: close to the bf16/fp32 results, and not equal to them (an FP8
path that silently fell back to the original weights would pass a closeness check alone).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dispider_vllm.fp8 import FP8, Fp8Linear, fp8_linear, fp8_sequential, quantize
from dispider_vllm.perception.encoder import PerceptionEncoder
from dispider_vllm.perception.modules import PerceptionDecisionModules
from dispider_vllm.types import Clip


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_quantize_maps_the_largest_magnitude_to_the_fp8_maximum():
    x = torch.tensor([[0.5, -2.0], [1.0, 0.25]])
    quantized, scale = quantize(x)
    assert quantized.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (1,)
    assert float(quantized.float().abs().max()) == 448.0 and float(scale) == pytest.approx(2.0 / 448)
    torch.testing.assert_close(quantized.float() * scale, x, rtol=0.07, atol=0)


def test_an_fp8_linear_stays_close_to_the_linear_it_replaces():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    fp8 = fp8_linear(linear)
    assert isinstance(fp8, Fp8Linear) and fp8.weight_t.dtype == FP8
    got, want = fp8(x), linear(x)
    assert got.shape == want.shape == (3, 5, 48)
    assert 0 < relative_error(got, want) < 0.06
    assert fp8_linear(linear) is fp8  # one FP8 copy, whoever asks


def test_linears_fp8_cannot_help_keep_their_weights():
    head, odd = nn.Linear(64, 1, bias=False), nn.Linear(40, 64)
    assert fp8_linear(head) is head and fp8_linear(odd) is odd
    projector = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 32))
    converted = fp8_sequential(projector)
    assert [type(m) for m in converted] == [Fp8Linear, nn.GELU, Fp8Linear]
    assert type(projector[0]) is nn.Linear  # the original projector is unchanged


def test_the_encoder_in_fp8_gives_close_clip_features():
    modules = PerceptionDecisionModules.random(seed=3)
    clips = [Clip(index=i, start=16.0 * i, end=16.0 * (i + 1), pixels=torch.randn(16, 3, 224, 224)) for i in range(2)]
    exact = PerceptionEncoder(modules, cuda_graphs=False).encode(clips)
    encoder = PerceptionEncoder(modules, cuda_graphs=False, fp8=True)
    assert all(isinstance(linear, Fp8Linear) for linear in encoder._clip_linears[0])
    assert isinstance(encoder._projector[0], Fp8Linear) and encoder.lm.fp8
    approximate = encoder.encode(clips)
    for a, b in zip(exact, approximate):
        # Measured on this checkpoint: raw (CLIP only) ~2%, M and T (through the compact LLM too) ~11%.
        assert 0 < relative_error(b.raw, a.raw) < 0.05
        for name in ("memory", "indicator"):
            error = relative_error(getattr(b, name), getattr(a, name))
            assert 0 < error < 0.2, (name, error)
            cosine = torch.nn.functional.cosine_similarity(getattr(a, name).flatten(), getattr(b, name).flatten(), 0)
            assert cosine > 0.98, (name, float(cosine))
