"""Fused kernels for the sidecar's transformer layers, taken from vLLM's compiled ops, with plain-torch fallbacks.

Written the plain way (as transformers does), RMSNorm is six elementwise kernels with fp32 intermediates, RoPE five
per tensor, the SiLU gate and CLIP's quick-GELU two or three each: on the H200 those memory-bound kernels took about
a third of the sidecar's GPU time (``benchmarks/results/sidecar_profile_h200.txt``). vLLM ships one-kernel versions
of each (``torch.ops._C``, built for both its CUDA and its CPU wheels), so the sidecar uses them wherever they load.

``fused_ops_available()`` says whether they do; ``DISPIDER_FUSED_OPS=0`` turns them off for models built after it
is set (the unfused baseline of ``benchmarks/sidecar_bench.py --compare-unfused``). Every function has a torch
fallback with the same maths.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn


def fused_ops_available() -> bool:
    """Whether vLLM's compiled ops load here and are not turned off by ``DISPIDER_FUSED_OPS=0``."""
    return os.environ.get("DISPIDER_FUSED_OPS", "1") != "0" and _vllm_ops_load()


@functools.cache
def _vllm_ops_load() -> bool:
    """Importing ``vllm._custom_ops`` registers vLLM's compiled ops under ``torch.ops._C``."""
    try:
        import vllm._custom_ops  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: use the torch fallbacks
        return False
    return all(hasattr(torch.ops._C, name)
               for name in ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "gelu_quick"))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, fused: bool) -> torch.Tensor:
    if fused:
        out = torch.empty_like(x)
        torch.ops._C.rms_norm(out, x.contiguous(), weight, eps)
        return out
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """residual + x, and its RMSNorm: (normed, new residual). The fused kernel works in place on both inputs."""
    if fused:
        x = x.contiguous()
        torch.ops._C.fused_add_rms_norm(x, residual, weight, eps)
        return x, residual
    residual = residual + x
    return rms_norm(residual, weight, eps, fused=False), residual


def silu_and_mul(gate_up: torch.Tensor, *, fused: bool) -> torch.Tensor:
    """[..., 2d] (gate, then up) -> silu(gate) * up [..., d]."""
    half = gate_up.shape[-1] // 2
    if fused:
        out = gate_up.new_empty((*gate_up.shape[:-1], half))
        torch.ops._C.silu_and_mul(out, gate_up)
        return out
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]


def quick_gelu(x: torch.Tensor, *, fused: bool) -> torch.Tensor:
    if fused:
        out = torch.empty_like(x)
        torch.ops._C.gelu_quick(out, x.contiguous())
        return out
    return x * torch.sigmoid(1.702 * x)


class Rotary:
    """RoPE in the half-split (neox) layout Qwen2 uses, applied in place to flat q and k [tokens, heads*dim]."""

    def __init__(self, inv_freq: torch.Tensor, head_dim: int, dtype: torch.dtype, *, fused: bool):
        self.inv_freq, self.head_dim, self.dtype, self.fused = inv_freq, head_dim, dtype, fused
        self._cache = torch.empty(0, head_dim, dtype=dtype, device=inv_freq.device)

    def cos_sin(self, positions: int) -> torch.Tensor:
        """[positions, head_dim]: cos of each frequency, then sin (fp32 maths, model dtype out, as transformers)."""
        if self._cache.shape[0] < positions:
            length = max(positions, 2 * self._cache.shape[0], 2048)
            angles = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)[:, None] * self.inv_freq
            self._cache = torch.cat((angles.cos(), angles.sin()), dim=-1).to(self.dtype)
        return self._cache

    def apply_(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, *,
               max_position: int | None = None) -> None:
        """Rotate q [T, Hq*dim] and k [T, Hk*dim] in place by ``positions`` [T].

        ``max_position``: a bound on ``positions`` the caller knows; without it the largest position is read back
        from the device, a synchronisation (and not allowed inside a CUDA graph capture).
        """
        largest = int(positions.max()) if max_position is None else max_position
        cache = self.cos_sin(largest + 1)
        if self.fused:
            torch.ops._C.rotary_embedding(positions, q, k, self.head_dim, cache, True)
            return
        cos, sin = cache[positions].chunk(2, dim=-1)
        for x in (q, k):
            heads = x.view(x.shape[0], -1, self.head_dim)
            first, second = heads[..., : self.head_dim // 2], heads[..., self.head_dim // 2 :]
            rotated_first = first * cos[:, None] - second * sin[:, None]
            rotated_second = second * cos[:, None] + first * sin[:, None]
            heads.copy_(torch.cat((rotated_first, rotated_second), dim=-1))


def merged_linear(module: nn.Module, name: str, linears: list[nn.Linear]) -> nn.Linear:
    """One linear for several that read the same input, so they run as one matmul.

    The linears' own parameters become views into the merged tensors (no second copy of the weights, and the
    transformers module keeps working); the result is cached on ``module`` so every caller shares it.
    """
    cached = module.__dict__.get(name)
    if cached is not None:
        return cached
    weight = torch.cat([linear.weight.detach() for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
    if any(b is not None for b in biases) and bias is None:
        raise ValueError(f"{name}: either all or none of the merged linears need a bias")
    row = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = weight[row : row + rows]
        if bias is not None:
            linear.bias.data = bias[row : row + rows]
        row += rows
    merged = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")  # no allocation
    merged.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        merged.bias = nn.Parameter(bias, requires_grad=False)
    module.__dict__[name] = merged
    return merged


def paged_attention_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether vLLM's FlashAttention (``vllm.vllm_flash_attn``, paged K/V) runs here: a CUDA device, fp16/bf16,
    and not turned off by ``DISPIDER_PAGED_ATTENTION=0`` (the masked-SDPA baseline)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return os.environ.get("DISPIDER_PAGED_ATTENTION", "1") != "0" and _flash_version() is not None


@functools.cache
def _flash_version() -> int | None:
    """FA3 where it is supported (Hopper), else FA2; None when neither loads."""
    try:
        from vllm.vllm_flash_attn import is_fa_version_supported
    except Exception:  # noqa: BLE001 - any import failure means: the SDPA path
        return None
    return next((version for version in (3, 2) if is_fa_version_supported(version)), None)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, query_starts: torch.Tensor,
                    query_length: int, key_lengths: torch.Tensor, max_keys: int, pages: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Causal attention of packed queries q [rows * query_length, heads, dim] over each row's K/V read in place
    from a paged cache [pages, page_size, kv_heads, dim]: row b's keys are the first ``key_lengths[b]`` positions
    of page ``pages[b, 0]``, its queries the last of them (the causal mask is aligned bottom right)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k_cache, v_cache, max_seqlen_q=query_length, cu_seqlens_q=query_starts,
                                  max_seqlen_k=max_keys, seqused_k=key_lengths, block_table=pages, causal=True,
                                  softmax_scale=scale, fa_version=_flash_version())
