"""FP8 (E4M3) linears for the sidecar's two models: weights quantized once, activations per call.

The sidecar's GPU time is matmuls (``benchmarks/results/sidecar_profile_h200.txt``), and an H100/H200 runs FP8
matmuls at twice the bf16 rate. This is the scheme vLLM's own ``--quantization fp8`` applies to a bf16 checkpoint
(its online, dynamic FP8): one scale per weight tensor, one scale per activation tensor computed on the device at
each call (no host synchronisation, so it runs inside CUDA graphs), a bf16 (model dtype) result.

``--sidecar-quantization fp8`` turns it on; it changes the numerics (a linear's output moves by about 4% of its
norm on random weights and inputs; the clip memory, through the whole compact model, by about 11%), so it is off
by default. Linears whose sizes are not multiples of 16 (cuBLAS's FP8 needs
them) and the one-logit decision head stay as they are.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class Fp8Linear(nn.Module):
    """``linear``'s maths with its weight in FP8: y = (x_q @ w_q^T) * sx * sw + b."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        quantized, self.weight_scale = quantize(weight)
        # (out, in) row-major, read as its transpose: the column-major (in, out) operand _scaled_mm wants.
        self.weight_t = quantized.t()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        quantized, scale = quantize(flat)
        out = torch._scaled_mm(quantized, self.weight_t, scale_a=scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (x in FP8, its fp32 scale [1]) with x ~= x_fp8 * scale; the scale maps x's largest magnitude to 448.

    On a GPU this is vLLM's one-kernel dynamic quantization; elsewhere the same maths in torch.
    """
    if x.is_cuda and _vllm_quant_op():
        from vllm import _custom_ops as ops

        return ops.scaled_fp8_quant(x.contiguous())
    scale = (x.abs().amax().float() / FP8_MAX).clamp(min=1e-12).reshape(1)
    return (x / scale.to(x.dtype)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def eligible(linear: nn.Module) -> bool:
    """Whether ``linear`` gets an FP8 weight: a plain linear with both sizes multiples of 16 (cuBLAS's FP8 needs
    them; a one-logit head has nothing to gain)."""
    return (type(linear) is nn.Linear and linear.in_features % 16 == 0 and linear.out_features % 16 == 0)


def fp8_linear(linear: nn.Module) -> nn.Module:
    """``linear`` with an FP8 weight where it is :func:`eligible`, else ``linear`` itself. Cached on the linear, so
    the perception's and the decision's views of one model share one FP8 copy of each weight."""
    if not eligible(linear):
        return linear
    cached = linear.__dict__.get("_dispider_fp8")
    if cached is None:
        cached = linear.__dict__["_dispider_fp8"] = Fp8Linear(linear)
    return cached


def fp8_sequential(sequential: nn.Sequential) -> nn.Sequential:
    """A projector (Linear, activation, Linear ...) with its eligible linears in FP8; the original is unchanged."""
    return nn.Sequential(*(fp8_linear(module) for module in sequential))


def check_supported(device: torch.device) -> None:
    """A clear error where FP8 matmuls cannot run: a GPU older than Ada/Hopper (compute capability 8.9)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"--sidecar-quantization fp8 needs a GPU of compute capability 8.9 or newer "
                         f"(Ada, Hopper); {name} is {torch.cuda.get_device_capability(device)}")


@functools.cache
def _vllm_quant_op() -> bool:
    try:
        import vllm._custom_ops  # noqa: F401 - registers torch.ops._C
    except Exception:  # noqa: BLE001 - no vLLM ops here: the torch path
        return False
    return hasattr(torch.ops._C, "dynamic_scaled_fp8_quant")
