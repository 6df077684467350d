"""Kernel selection for the model's hot ops.

Layers pick their implementation once, when they are built: inside
``use_native_kernels(lib)`` they capture the compiled CPU library and call it for fp32
CPU tensors; otherwise (CUDA, other dtypes, no compiler) they run the portable torch
code, which is also the reference the native kernels are tested against.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

_NATIVE: ContextVar[ctypes.CDLL | None] = ContextVar("pagellm_native_lib", default=None)


@contextmanager
def use_native_kernels(lib: ctypes.CDLL | None) -> Iterator[None]:
    """Layers built inside this block use ``lib`` (None: torch ops only)."""
    token = _NATIVE.set(lib)
    try:
        yield
    finally:
        _NATIVE.reset(token)


def current_native_lib() -> ctypes.CDLL | None:
    return _NATIVE.get()


_QUANT_NATIVE: ContextVar[ctypes.CDLL | None] = ContextVar("pagellm_quant_lib", default=None)


@contextmanager
def use_quant_kernels(lib: ctypes.CDLL | None) -> Iterator[None]:
    """Quantized layers built inside this block run on ``lib``'s integer-dot kernels
    whatever the run dtype (their activations become int8 blocks anyway): a bf16 model
    with GGUF/int8/int4 weights keeps them packed instead of dequantizing every call.
    (The other native kernels are float32 only and follow ``use_native_kernels``.)"""
    token = _QUANT_NATIVE.set(lib)
    try:
        yield
    finally:
        _QUANT_NATIVE.reset(token)


def current_quant_lib() -> ctypes.CDLL | None:
    return _QUANT_NATIVE.get() or _NATIVE.get()


_WEIGHT_DTYPE: ContextVar[torch.dtype | None] = ContextVar("pagellm_weight_dtype", default=None)

# the wtype argument of pagellm_linear_half
_HALF_TYPES = {torch.bfloat16: 1, torch.float16: 2}


@contextmanager
def use_weight_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Unquantized linear weights built inside this block are stored in ``dtype`` while
    the activations stay in the default dtype: a bf16/fp16 run on the CPU keeps its
    weights in 16 bits and does its arithmetic in float32 on the native kernels."""
    token = _WEIGHT_DTYPE.set(dtype)
    try:
        yield
    finally:
        _WEIGHT_DTYPE.reset(token)


def half_weight_type(dtype: torch.dtype) -> int:
    """pagellm_linear_half's code of a 16-bit weight dtype; 0 for float32."""
    return _HALF_TYPES.get(dtype, 0)


def current_weight_dtype() -> torch.dtype | None:
    return _WEIGHT_DTYPE.get()


def num_threads() -> int:
    return torch.get_num_threads()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def is_native_tensor(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lib: ctypes.CDLL | None,
) -> torch.Tensor:
    """x[M, K] @ weight[N, K]^T (+ bias)."""
    # Native for every batch size: one reduction order for all rows keeps a request's
    # result independent of its batch; it also beats MKL on 2 AVX2 cores up to a few
    # hundred rows and trails it by under 10% beyond (docs/benchmarks.md).
    if lib is not None and x.dim() == 2 and is_native_tensor(x) and x.stride(1) == 1:
        M, K = x.shape
        N = weight.shape[0]
        y = torch.empty((M, N), dtype=x.dtype)
        wtype = half_weight_type(weight.dtype)
        if wtype:  # 16-bit weights, float32 arithmetic
            lib.pagellm_linear_half(
                x.data_ptr(), x.stride(0), weight.data_ptr(), wtype, _ptr(bias), y.data_ptr(),
                M, N, K, num_threads(),
            )  # fmt: skip
        else:
            lib.pagellm_linear_f32(
                x.data_ptr(), x.stride(0), weight.data_ptr(), _ptr(bias), y.data_ptr(),
                M, N, K, num_threads(),
            )  # fmt: skip
        return y
    if weight.dtype != x.dtype:  # stored weights in 16 bits without the kernels
        weight = weight.to(x.dtype)
    return F.linear(x, weight, bias)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    lib: ctypes.CDLL | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual); without residual, residual := x."""
    if lib is not None and is_native_tensor(x) and x.is_contiguous():
        M, N = x.shape
        out = torch.empty_like(x)
        if residual is None:
            lib.pagellm_rms_norm_f32(
                x.data_ptr(), None, weight.data_ptr(), out.data_ptr(), M, N, eps, num_threads()
            )
            return out, x
        assert residual.is_contiguous()
        lib.pagellm_rms_norm_f32(
            x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), M, N, eps, num_threads()
        )  # fmt: skip
        return out, residual
    if residual is not None:
        x = x + residual
    residual = x
    orig = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(orig), residual


def silu_and_mul(x: torch.Tensor, lib: ctypes.CDLL | None) -> torch.Tensor:
    """silu(x[:, :N]) * x[:, N:] for x[M, 2N]."""
    if lib is not None and is_native_tensor(x) and x.is_contiguous():
        M, N2 = x.shape
        out = torch.empty((M, N2 // 2), dtype=x.dtype)
        lib.pagellm_silu_and_mul_f32(x.data_ptr(), out.data_ptr(), M, N2 // 2, num_threads())
        return out
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
