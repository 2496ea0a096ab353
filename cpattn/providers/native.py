"""PyTorch's own attention: SDPA (`native`) and its four backends called through their LSE-returning aten ops.

The single-device path calls the aten op of the chosen backend directly (autograd comes from PyTorch's own
derivative formulas), which skips the `sdpa_kernel` context manager and its host cost. The contract's
forward/backward call the same ops and their backward ops with an external (out, lse).
"""

from __future__ import annotations

import functools

import dataclasses

import torch
import torch.nn.functional as F

from ..contract import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    AttentionCall,
    Capabilities,
    Provider,
    causal_mask,
    default_scale,
    empty_query_rows,
    expand_kv,
    lse_for_kernel_backward,
    normalize_lse,
    reduce_kv_grad,
    rows_may_be_empty,
)
from ..masks import as_additive, open_empty_rows

# Overloads are called as `.default`: resolving the overload packet with keyword arguments costs ~2 us a call.
aten = torch.ops.aten
# The C entry of F.scaled_dot_product_attention, captured so that patching F never makes `native` recurse.
_C_SDPA = torch._C._nn.scaled_dot_product_attention


def _kv(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    key, value = call.key, call.value
    if key.shape[1] == call.query.shape[1]:  # no GQA: the common case, kept cheap (it is on the hot path)
        return key, value
    groups = call.groups
    return expand_kv(key, groups), expand_kv(value, groups)


def _mask_with_causal(call: AttentionCall) -> tuple[torch.Tensor | None, bool]:
    """Fold is_causal into the mask when both are given (the aten kernels take one or the other)."""
    if call.attn_mask is None or not call.is_causal:
        return call.attn_mask, call.is_causal
    causal = causal_mask(call.q_len, call.kv_len, call.device)
    mask = call.attn_mask
    if mask.dtype == torch.bool:
        return mask & causal, False
    return mask.masked_fill(~causal, float("-inf")), False


def _cpu_flash_bias(call: AttentionCall) -> tuple[torch.Tensor | None, bool]:
    """The CPU flash kernel's (attn_mask, is_causal): the mask additive, with 2 or 4 dims (the kernel refuses the
    1-D and 3-D masks SDPA broadcasts; leading 1s broadcast the same)."""
    mask, causal = _mask_with_causal(call)
    if mask is None:
        return None, causal
    if mask.dim() not in (2, 4):
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return as_additive(mask, call.dtype), causal


def _scale_arg(call: AttentionCall) -> dict:
    """The scale keyword for an aten call: none for the default 1/sqrt(head dim), which the kernels compute the
    same way in double precision (same bits); passing the keyword costs ~0.6 us of argument parsing a call."""
    return {} if call.scale == default_scale(call.head_dim) else {"scale": call.scale}


def _grads(call: AttentionCall, dq, dk, dv):
    return dq, reduce_kv_grad(dk, call.groups), reduce_kv_grad(dv, call.groups)


# A window on a kernel without one runs as a boolean mask (cpattn/scoremods.py): exact, but every score of
# the (Sq, Sk) matrix is still computed.
DENSE_WINDOW_NOTE = "window=(left, right) runs as a dense boolean mask: exact, but no work outside it is skipped"


class NativeMath(Provider):
    """SDPA's math backend: exact, every dtype and mask, materialises the (Sq, Sk) score matrix. A softcap runs
    as explicit math in the same precision (the aten op has no softcap argument)."""

    name = "_native_math"
    family = "native"
    description = "PyTorch SDPA math backend (reference-exact, O(S^2) memory)"
    _caps = Capabilities(
        dtypes=FLOAT_DTYPES, bool_mask=True, additive_mask=True, key_padding_mask=True, dropout=True,
        backward=True, training=True, row_views=True,  # plain matmuls: any strides
        softcap=True,
        notes=(DENSE_WINDOW_NOTE, "softcap as explicit math over the materialised scores (torch autograd)"),
    )
    supports = {"cpu": _caps, "cuda": _caps}

    def attention(self, call: AttentionCall) -> torch.Tensor:
        if call.softcap is not None:
            return softcapped_attention(call)
        mask, causal = _mask_with_causal(call)
        # The aten op reads a bool mask differently from F.sdpa: give it the additive form SDPA builds.
        return aten._scaled_dot_product_attention_math.default(
            call.query, call.key, call.value, as_additive(mask, call.dtype), call.dropout_p, causal, scale=call.scale,
            enable_gqa=call.groups > 1,
        )[0]

    def forward(self, call):
        k, v = _kv(call)
        scores = masked_scores(call, capped_scores(call, k)[0])
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
        out = (probs @ v.to(probs.dtype)).to(call.dtype)
        return out, lse.float()

    def backward(self, call, dout, out, lse):
        # With the global (out, lse): P = exp(s - lse), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)); under a
        # softcap s = c * tanh(x / c) of the raw score x, and dX = dS * (1 - tanh(x / c)^2).
        k, v = _kv(call)
        capped, tanh = capped_scores(call, k)
        scores = masked_scores(call, capped)
        acc = scores.dtype
        probs = torch.exp(scores - lse_for_kernel_backward(lse).to(acc).unsqueeze(-1))
        dout_a = dout.to(acc)
        delta = (dout_a * out.to(acc)).sum(dim=-1, keepdim=True)
        dscores = probs * (dout_a @ v.to(acc).transpose(-1, -2) - delta)
        if tanh is not None:
            dscores = dscores * (1 - tanh * tanh)
        dq = (dscores @ k.to(acc)) * call.scale
        dk = (dscores.transpose(-1, -2) @ call.query.to(acc)) * call.scale
        dv = probs.transpose(-1, -2) @ dout_a
        return _grads(call, dq.to(call.dtype), dk.to(call.dtype), dv.to(call.dtype))


def _accumulation_dtype(call: AttentionCall) -> torch.dtype:
    return torch.float64 if call.dtype == torch.float64 else torch.float32


def capped_scores(call: AttentionCall, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale * q k^T with the call's softcap applied, tanh(x / c) of the raw scores x, None without a softcap),
    in float64 for float64 inputs, float32 otherwise; differentiable."""
    acc = _accumulation_dtype(call)
    scores = (call.query.to(acc) @ k.to(acc).transpose(-1, -2)) * call.scale
    if call.softcap is None:
        return scores, None
    tanh = torch.tanh(scores / call.softcap)
    return call.softcap * tanh, tanh


def masked_scores(call: AttentionCall, scores: torch.Tensor) -> torch.Tensor:
    """`scores` with the call's mask and causality applied (after the softcap, as the reference orders them)."""
    mask, causal = _mask_with_causal(call)
    if mask is not None:
        scores = scores + as_additive(mask, scores.dtype)
    if causal:
        scores = scores.masked_fill(~causal_mask(call.q_len, call.kv_len, call.device), float("-inf"))
    return scores


def softcapped_attention(call: AttentionCall) -> torch.Tensor:
    """Math attention under a softcap with torch's autograd: the single-device path of `_native_math`.

    Rows that see no key are given finite stand-in scores and a zero output: the softmax of a row of -inf is
    NaN, and an additive mask would pass that NaN on to the gradients of q and k."""
    k, v = _kv(call)
    scores = masked_scores(call, capped_scores(call, k)[0])
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if call.dropout_p > 0:
        probs = F.dropout(probs, call.dropout_p)
    return (probs @ v.to(probs.dtype)).to(call.dtype)


def _flash_breaks(call: AttentionCall) -> bool:
    """Calls PyTorch's flash kernel gets wrong: a zero-length query or key sequence kills the process with
    SIGFPE on CPU (a context-parallel rank holding no token passes exactly that), and on CPU is_causal with
    scale 0 gives NaN. They go to the math path (exact; nothing to tile)."""
    q, k = call.query, call.key
    return q.shape[2] == 0 or k.shape[2] == 0 or (call.is_causal and call.scale == 0 and not q.is_cuda)


_MATH_FALLBACK = NativeMath()


class NativeFlash(Provider):
    """SDPA's flash backend: FlashAttention-2 inside PyTorch on CUDA, a tiled C++ kernel on CPU."""

    name = "_native_flash"
    family = "native"
    description = "PyTorch SDPA flash backend (FlashAttention-2 on CUDA; tiled kernel on CPU)"
    supports = {
        "cpu": Capabilities(
            dtypes=FLOAT_DTYPES, bool_mask=True, additive_mask=True, key_padding_mask=True,
            backward=True, training=True,
            notes=("CPU kernel takes masks as an additive bias; dropout is not supported on CPU", DENSE_WINDOW_NOTE),
        ),
        "cuda": Capabilities(
            dtypes=HALF_DTYPES, max_head_dim=256, head_dim_multiple=8, min_compute_capability=(8, 0),
            dropout=True, backward=True, training=True, deterministic_backward=False,
            notes=("no attn_mask on CUDA: use _native_efficient, _native_cudnn or flash_varlen for masks",
                   "is_causal needs q_len == kv_len on CUDA (the kernel aligns causal masks bottom-right)"),
        ),
    }

    def extra_reasons(self, call, caps):
        reasons = []
        if call.head_dim != call.value_dim:  # the CPU kernel refuses them too
            reasons.append(f"query head dim {call.head_dim} != value head dim {call.value_dim}")
        if call.device.type != "cpu" and call.is_causal and call.q_len != call.kv_len and call.q_len and call.kv_len:
            # FlashAttention-2 aligns its causal mask to the bottom-right corner; SDPA's is_causal means top-left,
            # so this backend gives wrong outputs for such a call (SDPA itself never picks it for one; the GPU
            # fuzz check in tests/gpu/gpu_fuzz.py found it). The CPU kernel aligns top-left.
            reasons.append(
                f"is_causal with q_len {call.q_len} != kv_len {call.kv_len}: the CUDA kernel aligns the causal mask "
                "to the bottom-right corner, SDPA to the top-left; use _native_efficient, _native_cudnn or native")
        return reasons

    def runner(self, call):
        if _flash_breaks(call) or call.attn_mask is not None or call.groups > 1:
            return super().runner(call)
        dropout_p, causal, scale = call.dropout_p, call.is_causal, _scale_arg(call)
        if call.query.is_cuda:
            op = aten._scaled_dot_product_flash_attention.default
            return lambda q, k, v, mask: op(q, k, v, dropout_p, causal, False, **scale)[0]
        op = aten._scaled_dot_product_flash_attention_for_cpu.default
        return lambda q, k, v, mask: op(q, k, v, dropout_p, causal, **scale)[0]

    def attention(self, call):
        # The path of a call's first dispatch (later ones take `runner`): skip mask handling without a mask.
        if _flash_breaks(call):
            return _MATH_FALLBACK.attention(call)
        k, v = _kv(call)
        q = call.query
        if q.is_cuda:
            return aten._scaled_dot_product_flash_attention.default(
                q, k, v, call.dropout_p, call.is_causal, False, scale=call.scale
            )[0]
        mask, causal = _cpu_flash_bias(call)
        return aten._scaled_dot_product_flash_attention_for_cpu.default(
            q, k, v, call.dropout_p, causal, attn_mask=mask, scale=call.scale
        )[0]

    def forward(self, call):
        if _flash_breaks(call):
            return _MATH_FALLBACK.forward(call)
        k, v = _kv(call)
        if call.device.type == "cpu":
            mask, causal = _cpu_flash_bias(call)
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu.default(
                call.query, k, v, 0.0, causal, attn_mask=mask, scale=call.scale
            )
            # The CPU kernel writes lse = 0 for rows that see no key: find them from the mask.
            return out, normalize_lse(lse, call.q_len, empty_rows=empty_query_rows(call),
                                  may_be_empty=rows_may_be_empty(call))
        out, lse, *_ = aten._scaled_dot_product_flash_attention.default(
            call.query, k, v, 0.0, call.is_causal, False, scale=call.scale
        )
        return out, normalize_lse(lse, call.q_len, may_be_empty=rows_may_be_empty(call))

    def backward(self, call, dout, out, lse):
        if _flash_breaks(call):
            return _MATH_FALLBACK.backward(call, dout, out, lse)
        k, v = _kv(call)
        if call.device.type == "cpu":
            mask, causal = _cpu_flash_bias(call)
            acc = torch.float64 if call.dtype == torch.float64 else torch.float32
            dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
                dout, call.query, k, v, out, lse_for_kernel_backward(lse).to(acc), 0.0, causal,
                attn_mask=mask, scale=call.scale,
            )
            return _grads(call, dq, dk, dv)
        # cum_seq_q/k undefined (None): a defined tensor there selects the nested/varlen kernel.
        rng = torch.zeros(2, dtype=torch.uint64, device=call.device)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward.default(
            dout, call.query, k, v, out, lse_for_kernel_backward(lse, rows_may_be_empty(call)), None, None,
            call.q_len, call.kv_len, 0.0, call.is_causal, rng, torch.empty(0, dtype=torch.uint64, device=call.device),
            scale=call.scale,
        )
        return _grads(call, dq, dk, dv)


def _aligned_bias(call: AttentionCall) -> torch.Tensor | None:
    """Additive bias for the CUDA kernels: (B, H, Sq, Sk) view over storage whose rows are 16-aligned."""
    mask, _ = _mask_with_causal(call)
    if mask is None:
        return None
    bias = as_additive(mask, call.dtype).expand(call.batch, call.q_heads, call.q_len, call.kv_len)
    pad = (-call.kv_len) % 16
    if pad:
        bias = F.pad(bias, (0, pad))[..., : call.kv_len]
    return bias


def _sequence_major(out: torch.Tensor) -> torch.Tensor:
    """`out` (B, H, S, D) stored as (B, S, H, D), the layout the efficient forward returns.

    The CUTLASS backward takes the strides of dO, Q, K and V from the tensors but derives out's sequence stride
    as H * D, i.e. it assumes this storage. A ring passes its merged output, stored (B, H, S, D): on two H200s
    that gave correct outputs and dV but dQ and dK off by up to 8.7 (the per-row dO . out term was read from
    the wrong rows). One copy when the storage differs; none for the kernel's own output.
    """
    if out.transpose(1, 2).is_contiguous():
        return out
    return out.transpose(1, 2).contiguous().transpose(1, 2)


class NativeEfficient(Provider):
    """SDPA's memory-efficient backend (xformers' CUTLASS kernel inside PyTorch): masks as a bias, fp32 too."""

    name = "_native_efficient"
    family = "native"
    description = "PyTorch SDPA memory-efficient backend (CUTLASS), takes an additive bias"
    supports = {
        "cuda": Capabilities(
            dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), max_head_dim=512,
            head_dim_multiple=8, min_compute_capability=(5, 0), bool_mask=True, additive_mask=True,
            key_padding_mask=True, dropout=True, backward=True, training=True, deterministic_backward=False,
            notes=(DENSE_WINDOW_NOTE,),
        ),
    }

    def _causal(self, call):
        return _mask_with_causal(call)[1]

    @staticmethod
    def _kv(call):
        # The CUTLASS backward reads K/V as dense (B, H, S, D): a ring's column slice of a KV block (a strided
        # view) gave NaN gradients on an H100, so give it contiguous storage (a no-op when already dense).
        k, v = _kv(call)
        return k.contiguous(), v.contiguous()

    def attention(self, call):
        k, v = self._kv(call)
        return aten._scaled_dot_product_efficient_attention.default(
            call.query, k, v, _aligned_bias(call), call.needs_grad, call.dropout_p, self._causal(call),
            scale=call.scale,
        )[0]

    def forward(self, call):
        k, v = self._kv(call)
        out, lse, *_ = aten._scaled_dot_product_efficient_attention.default(
            call.query, k, v, _aligned_bias(call), True, 0.0, self._causal(call), scale=call.scale
        )
        return out, normalize_lse(lse, call.q_len, empty_rows=empty_query_rows(call),
                                  may_be_empty=rows_may_be_empty(call))

    def backward(self, call, dout, out, lse):
        k, v = self._kv(call)
        bias = _aligned_bias(call)
        # The kernel reads lse rows padded to a multiple of 32 on some versions; give it that storage.
        lse_k = lse_for_kernel_backward(lse, rows_may_be_empty(call))
        pad = (-call.q_len) % 32
        if pad:
            lse_k = F.pad(lse_k, (0, pad))
        seed = torch.zeros((), dtype=torch.int64, device=call.device)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward.default(
            dout, call.query, k, v, bias, _sequence_major(out),
            lse_k, seed, seed, 0.0, [True, True, True, False], self._causal(call), scale=call.scale,
        )
        return _grads(call, dq, dk, dv)


def _cudnn_backward_refuses(call: AttentionCall) -> bool:
    """cuDNN's backward raises "s_q = s_kv = 1 is not supported" (cuDNN 9.19; found by tests/gpu/gpu_fuzz.py):
    a one-token sequence that needs gradients, or a 1 x 1 ring block, goes to the math path (exact; one score)."""
    return call.q_len == 1 and call.kv_len == 1


class NativeCudnn(Provider):
    """SDPA's cuDNN backend: the fastest PyTorch kernel on Hopper."""

    name = "_native_cudnn"
    family = "native"
    description = "PyTorch SDPA cuDNN backend"
    supports = {
        "cuda": Capabilities(
            dtypes=HALF_DTYPES, max_head_dim=128, head_dim_multiple=8, min_compute_capability=(8, 0),
            bool_mask=True, additive_mask=True, key_padding_mask=True, dropout=True, backward=True,
            training=True, deterministic_backward=False,
            row_views=True,  # SDPA hands cuDNN each tensor's strides; dO and out views share their parents' layout
            notes=("with gradients, q_len == kv_len == 1 runs on the math path (cuDNN's backward refuses it)",
                   DENSE_WINDOW_NOTE),
        ),
    }

    def extra_reasons(self, call, caps):
        if call.head_dim != call.value_dim:
            return [f"query head dim {call.head_dim} != value head dim {call.value_dim}"]
        return []

    def runner(self, call):
        if call.attn_mask is not None or call.groups > 1 or (call.needs_grad and _cudnn_backward_refuses(call)):
            return super().runner(call)
        op = aten._scaled_dot_product_cudnn_attention.default
        lse, dropout_p, causal, scale = call.needs_grad, call.dropout_p, call.is_causal, _scale_arg(call)
        return lambda q, k, v, mask: op(q, k, v, None, lse, dropout_p, causal, False, **scale)[0]

    def attention(self, call):
        if call.needs_grad and _cudnn_backward_refuses(call):
            return _MATH_FALLBACK.attention(call)
        k, v = _kv(call)
        causal, bias = call.is_causal, None
        if call.attn_mask is not None:
            causal, bias = _mask_with_causal(call)[1], _aligned_bias(call)
        return aten._scaled_dot_product_cudnn_attention.default(
            call.query, k, v, bias, call.needs_grad, call.dropout_p, causal, False, scale=call.scale
        )[0]

    def forward(self, call):
        k, v = _kv(call)
        causal = _mask_with_causal(call)[1]
        out, lse, *_ = aten._scaled_dot_product_cudnn_attention.default(
            call.query, k, v, _aligned_bias(call), True, 0.0, causal, False, scale=call.scale
        )
        return out, normalize_lse(lse, call.q_len, empty_rows=empty_query_rows(call),
                                  may_be_empty=rows_may_be_empty(call))

    def backward(self, call, dout, out, lse):
        if _cudnn_backward_refuses(call):
            return _MATH_FALLBACK.backward(call, dout, out, lse)
        k, v = _kv(call)
        causal = _mask_with_causal(call)[1]
        bias = _aligned_bias(call)
        seed = torch.zeros((), dtype=torch.int64, device=call.device)
        # cum_seq_q/k undefined (None): a defined tensor there makes cuDNN expect nested (3-D) inputs.
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward.default(
            dout, call.query, k, v, out,
            lse_for_kernel_backward(lse, rows_may_be_empty(call)).unsqueeze(-1).contiguous(), seed, seed,
            bias, None, None, call.q_len, call.kv_len, 0.0, causal, scale=call.scale,
        )
        return _grads(call, dq, dk, dv)


class Native(Provider):
    """`F.scaled_dot_product_attention` itself: PyTorch picks the backend. Under context parallelism the
    block kernel is the first of cuDNN, flash, efficient, math (CUDA) or flash, math (CPU) that takes the call.
    """

    name = "native"
    family = "native"
    description = "torch.nn.functional.scaled_dot_product_attention (PyTorch chooses the backend)"
    _caps = Capabilities(
        dtypes=FLOAT_DTYPES, bool_mask=True, additive_mask=True, key_padding_mask=True, dropout=True,
        backward=True, training=True, mask_grad=True, nested=True,  # SDPA itself takes jagged tensors
        notes=("block kernel under CP: first of cuDNN/flash/efficient/math (CUDA), flash/math (CPU) that fits",
               "takes jagged nested tensors (torch.nested) on one device as SDPA does; the only provider that does",
               DENSE_WINDOW_NOTE, "no softcap (SDPA has none): use flash, flex or _native_math"),
    )
    # On CUDA it runs cuDNN, flash or memory-efficient kernels, whose backward is not bitwise deterministic (each
    # of those providers declares deterministic_backward=False): neither is native's there.
    supports = {"cpu": _caps, "cuda": dataclasses.replace(_caps, deterministic_backward=False)}

    def __init__(self, candidates: dict[str, list[Provider]]):
        super().__init__()
        self._candidates = candidates

    def runner(self, call):
        if _flash_breaks(call) or call.attn_mask is not None:
            return super().runner(call)
        dropout_p, causal, keywords = call.dropout_p, call.is_causal, _scale_arg(call)
        if call.groups > 1:
            keywords["enable_gqa"] = True
        # The bound C function itself, no Python frame per call: the runner's fourth argument is the mask, None
        # here, which is SDPA's attn_mask.
        return functools.partial(_C_SDPA, dropout_p=dropout_p, is_causal=causal, **keywords)

    def attention(self, call):
        if _flash_breaks(call):  # SDPA would pick the flash kernel for these
            return _MATH_FALLBACK.attention(call)
        mask, causal = _mask_with_causal(call)  # SDPA refuses attn_mask together with is_causal
        if mask is not None and mask.dtype != torch.bool and mask.dtype != call.dtype:
            mask = mask.to(call.dtype)  # SDPA refuses a float mask of another dtype; every other provider casts
        empty = None
        if mask is not None and call.device.type == "cuda":
            # SDPA's CUDA backends disagree on rows that see no key: garbage outputs and NaN gradients were
            # measured on an H100 with a bool mask. Every cpattn provider returns 0 there, and a 0 gradient.
            mask, empty = open_empty_rows(mask)
        out = _C_SDPA(
            call.query, call.key, call.value, mask, call.dropout_p, causal,
            scale=call.scale, enable_gqa=call.groups > 1,
        )
        return out if empty is None else out.masked_fill(empty, 0.0)

    def block_kernel(self, call: AttentionCall) -> Provider:
        """The backend whose LSE-returning kernel runs `call` under context parallelism."""
        for provider in self._candidates[call.device.type]:
            if not provider.reasons(call, need_lse=True, need_backward=True):
                return provider
        return self._candidates[call.device.type][-1]

    def forward(self, call):
        return self.block_kernel(call).forward(call)

    def backward(self, call, dout, out, lse):
        return self.block_kernel(call).backward(call, dout, out, lse)


def make_providers() -> list[Provider]:
    math, flash, efficient, cudnn = NativeMath(), NativeFlash(), NativeEfficient(), NativeCudnn()
    native = Native({"cpu": [flash, math], "cuda": [cudnn, flash, efficient, math]})
    return [native, math, flash, efficient, cudnn]
