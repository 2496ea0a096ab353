"""The `flash` and `flash_varlen` providers: the contract over whichever FlashAttention generation is found.

`flash` takes fixed-length batches without masks. `flash_varlen` takes SDPA-style padded inputs with a boolean
key-padding mask (B or 1, 1, 1, Sk): keys and values are unpadded into cu_seqlens, queries stay padded as B
full-length sequences (layout.PaddedBatch); it also runs the packed API (`cpattn.flash_varlen_attention`,
through `FlashVarlen.packed_attention`).

Rows that see no key come back from the kernels with out 0 and lse +inf (FA2/FA3) or -inf (FA4): the contract
wants -inf, and +inf again when handed back to a backward kernel. flash-attn aligns causal masks to the
bottom-right corner, SDPA to the top-left: the two agree only when q_len == kv_len, the only case of is_causal
alone these providers accept. A window (is_causal folded into its band) reaches the kernels shifted to their
corner (score_mods.py), so rectangular windowed calls run wherever the shifted band has no negative side.

Window, softcap and sinks go to the generation's functions on every path (attention, forward, backward). Sinks
the generation does not take natively enter through the log-sum-exp here as well (cpattn/ops/sinks.py), so a
call's sinks are never dropped, whoever calls.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from ... import scoremods
from ...contract import (HALF_DTYPES, AttentionCall, Availability, Capabilities, ContractAttentionFunction,
                         Provider, device_capability, lse_for_kernel_backward, normalize_lse, on_device,
                         rows_may_be_empty)
from ...ops.sinks import add_sinks
from . import fa4_sm90_backward
from .generation import Generation
from .generation_choice import INSTALL_HINT, find_generation
from .layout import (Packing, PaddedBatch, align_head_dim, deterministic_algorithms, from_kernel_layout,
                     to_kernel_layout)
from .score_mods import NO_MODS, KernelMods, kernel_mods, wants_grad, window_reasons


class FlashFamily(Provider):
    """What `flash` and `flash_varlen` share: probing, capabilities, limits."""

    family = "flash"
    package = "flash-attn"
    min_version = "2.6.3"
    varlen: ClassVar[bool] = False
    # Static description for messages before probing; capabilities() gives the found generation's.
    supports = {
        "cuda": Capabilities(
            dtypes=HALF_DTYPES, max_head_dim=256, min_compute_capability=(8, 0), backward=True, training=True,
            deterministic_backward=False, window=True, softcap=True,
            notes=("FlashAttention-2/3/4, whichever is installed; windows and softcaps natively in every generation, "
                   "sinks natively in FlashAttention-4 (learnable_sink), through the log-sum-exp in the others",),
        )
    }

    def __init__(self) -> None:
        super().__init__()
        self._generation: Generation | None = None

    def _probe(self) -> Availability:
        self._generation = None
        found, missing, unusable = find_generation(self.varlen)
        if found is None:
            if unusable:  # installed but unusable: that is the news, say it first
                reason = f"{'; '.join(unusable)}. Other generations are not installed; or {INSTALL_HINT}"
            else:
                reason = f"FlashAttention is not installed: {INSTALL_HINT}"
            return Availability(False, None, reason)
        if unusable:  # a preferred generation is installed but broken or changed: say so, run on the next one
            warnings.warn(f"provider '{self.name}' uses {found.title} {found.version}; skipped: {'; '.join(unusable)}",
                          RuntimeWarning, stacklevel=3)
        self._generation = found
        return Availability(True, f"{found.label} {found.version}")

    def generation(self) -> Generation:
        self.require_available()
        return self._generation

    def capabilities(self, device_type: str) -> Capabilities | None:
        if not self.availability().ok:
            return self.supports.get(device_type)
        gen = self._generation
        if device_type == "cuda" or device_type in gen.standin_devices:
            return gen.capabilities()
        return None

    def head_dim_multiple(self, call: AttentionCall, backward: bool) -> int:
        """What the head dims are padded to for `call`'s kernels: HEAD_DIM_ALIGN unless the generation's backward
        needs more where it runs, or its forward is faster wider (see Generation.backward_head_dim_multiple and
        forward_head_dim_multiple)."""
        gen = self.generation()
        cc = device_capability(call.device) if call.device.type == "cuda" else None
        forward = gen.forward_head_dim_multiple(cc, call.head_dim)
        return math.lcm(forward, gen.backward_head_dim_multiple(cc)) if backward else forward

    def pads_head_dim(self, call: AttentionCall) -> bool:
        """Whether `call`'s kernels run on zero-padded copies of the inputs (see head_dim_multiple)."""
        return call.head_dim % self.head_dim_multiple(call, call.needs_grad) != 0

    def extra_reasons(self, call: AttentionCall, caps: Capabilities) -> list[str]:
        out = []
        if call.head_dim != call.value_dim:
            out.append(f"value head dim {call.value_dim} != query head dim {call.head_dim}")
        if call.is_causal and call.q_len != call.kv_len and call.window is None:
            out.append(
                f"is_causal with q_len {call.q_len} != kv_len {call.kv_len}: flash-attn aligns the causal mask to "
                "the bottom-right corner, SDPA to the top-left (they agree only for equal lengths)"
            )
        out += window_reasons(call) + self._generation.feature_reasons(call)
        if call.device.type == "cuda":
            out += self._generation.limits(call, device_capability(call.device))
        return out


class Flash(FlashFamily):
    """FlashAttention on fixed-length batches: no attn_mask, causal, GQA, dropout where the generation has it."""

    name = "flash"
    description = "FlashAttention-2/3/4 (flash-attn), fixed-length batches without masks"
    varlen = False

    def runner(self, call: AttentionCall):
        # No device guard: dispatch wraps cached runners that need one (several GPUs) itself.
        if _modified(call):  # dispatch caches none of these; the default rebuilds the call with its modifications
            return super().runner(call)
        kernel = self._kernel_of_bhsd(call)
        pad = (-call.head_dim) % self.head_dim_multiple(call, call.needs_grad)
        if not pad:
            return lambda q, k, v, mask: kernel(q, k, v)
        # Padded here rather than through `attention`: that path rebuilds the call and runs the public function
        # on five autograd nodes, host time that sets the pace of short calls with gradients.
        dim = call.value_dim
        return lambda q, k, v, mask: kernel(F.pad(q, (0, pad)), F.pad(k, (0, pad)), F.pad(v, (0, pad)))[..., :dim]

    def _kernel_of_bhsd(self, call: AttentionCall) -> Callable:
        """The cheapest function of (B, H, S, D) q, k, v (head dims already aligned) that runs `call`'s kernels:
        one autograd node for training where the generation has it, the bare forward without gradients."""
        gen = self.generation()
        if call.needs_grad and not call.dropout_p:
            training = gen.training_of_bhsd(call.scale, call.is_causal, deterministic_algorithms())
            if training is not None:
                return training
        if call.needs_grad or call.dropout_p:
            kernel = gen.function_of_qkv(call.scale, call.is_causal, call.dropout_p, deterministic_algorithms())
        else:  # the cache key holds the gradient flag: a call that needs one gets another runner
            kernel = gen.inference_of_qkv(call.scale, call.is_causal)
        return lambda q, k, v: kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    def attention(self, call: AttentionCall) -> torch.Tensor:
        gen = self.generation()
        if call.sinks is not None and not gen.native_sinks(call, _capability(call)):
            return sinks_through_lse(self, call)
        causal, mods = kernel_mods(call)
        multiple = self.head_dim_multiple(call, wants_grad(call))
        q, k, v = (to_kernel_layout(t, multiple) for t in (call.query, call.key, call.value))
        with on_device(call.device):
            out = gen.function(q, k, v, call.scale, causal, call.dropout_p, deterministic_algorithms(), mods)
        return from_kernel_layout(out, call.value_dim)

    def forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        gen = self.generation()
        causal, mods = kernel_mods(call, sinks=gen.takes_sinks())
        multiple = self.head_dim_multiple(call, backward=False)
        q, k, v = (to_kernel_layout(t.detach(), multiple) for t in (call.query, call.key, call.value))
        with torch.no_grad(), on_device(call.device):
            out, lse = gen.forward(q, k, v, call.scale, causal, mods)
        lse = normalize_lse(lse, call.q_len, may_be_empty=rows_may_be_empty(call))
        out = from_kernel_layout(out, call.value_dim)
        if call.sinks is not None and mods.sinks is None:  # the generation has no sink argument
            return add_sinks(out, lse, call.sinks)
        return out, lse

    def backward(self, call, dout, out, lse):
        gen = self.generation()
        # The kernels want out/dout in the input dtype (a ring may keep the global out in float32).
        dtype, multiple = call.dtype, self.head_dim_multiple(call, backward=True)
        q, k, v, o, do = (  # out and dO padded like v: zero columns add nothing to dO . out
            to_kernel_layout(t.detach() if t.dtype == dtype else t.detach().to(dtype), multiple)
            for t in (call.query, call.key, call.value, out, dout)
        )
        lse_k = lse_for_kernel_backward(lse.detach(), rows_may_be_empty(call)).float().contiguous()
        causal, mods = kernel_mods(call, sinks=False)  # `lse` holds the sinks: all the q/k/v gradients need
        with torch.no_grad(), on_device(call.device):
            dq, dk, dv = gen.backward(do, q, k, v, o, lse_k, call.scale, causal, deterministic_algorithms(), mods)
        return (from_kernel_layout(dq, call.head_dim), from_kernel_layout(dk, call.head_dim),
                from_kernel_layout(dv, call.value_dim))

    def shared_rows_backward(self, call, dout, out, lse):
        # FA4 on sm90 keeps one dQ accumulator over a ring rank's steps where it can (fa4_sm90_backward)
        shared = fa4_sm90_backward.shared_accumulator_backward(
            self, self.generation().row_backward_kernels(), call, dout, out, lse,
            self.head_dim_multiple(call, backward=True))
        return shared if shared is not None else super().shared_rows_backward(call, dout, out, lse)


class FlashVarlen(FlashFamily):
    """FlashAttention's varlen kernels: SDPA-style padded batches with key-padding masks (keys are unpadded
    into cu_seqlens), and packed sequences through `cpattn.flash_varlen_attention`."""

    name = "flash_varlen"
    description = "FlashAttention-2/3/4 varlen kernels: key-padding masks, packed sequences"
    varlen = True
    supports = {
        "cuda": dataclasses.replace(
            FlashFamily.supports["cuda"], key_padding_mask=True, varlen=True,
            notes=("FlashAttention-2/3/4 varlen kernels; masks: key padding (B, 1, 1, Sk) only; packed streams "
                   "under CP: flash_varlen_attention with global cu_seqlens (all-gather)",),
        )
    }

    def extra_reasons(self, call, caps):
        out = super().extra_reasons(call, caps)
        if call.is_causal and call.attn_mask is not None:
            out.append("is_causal together with a key-padding mask (unpadding keys would shift the causal diagonal)")
        if call.window is not None and call.attn_mask is not None:
            out.append(f"window={call.window} together with a key-padding mask (unpadding keys would move them "
                       "against the window); use provider 'flash' without a mask, or 'flex'")
        return out

    def attention(self, call: AttentionCall) -> torch.Tensor:
        gen = self.generation()
        if call.sinks is not None and not gen.native_sinks(call, _capability(call)):
            return sinks_through_lse(self, call)
        batch = PaddedBatch.from_call(call, self.head_dim_multiple(call, backward=wants_grad(call)))
        if batch.total_k == 0:  # every key hidden: no kernel call, the contract path gives zeros
            if call.sinks is not None:
                return sinks_through_lse(self, call)
            if call.needs_grad:
                return ContractAttentionFunction.apply(self, call, call.query, call.key, call.value)
            return self.forward(call)[0]
        causal, mods = kernel_mods(call)
        q = batch.pack_queries(call.query)
        k, v = batch.pack_keys(call.key), batch.pack_keys(call.value)
        with on_device(call.device):
            out = gen.varlen_function(q, k, v, batch.packing, call.scale, causal, call.dropout_p,
                                      deterministic_algorithms(), mods)
        return batch.zero_empty_rows(batch.unpack_queries(out, call.value_dim))[0]

    def forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        batch = PaddedBatch.from_call(call, self.head_dim_multiple(call, backward=False))
        if batch.total_k == 0:
            out = call.query.new_zeros(call.batch, call.q_heads, call.q_len, call.value_dim)
            lse = torch.full((call.batch, call.q_heads, call.q_len), float("-inf"), device=call.device)
            return add_sinks(out, lse, call.sinks) if call.sinks is not None else (out, lse)
        gen = self.generation()
        # Sequences without keys get lse -inf below, not the sink: with any of them the sinks join afterwards.
        causal, mods = kernel_mods(call, sinks=gen.takes_sinks() and batch.empty is None)
        q = batch.pack_queries(call.query.detach())
        k, v = batch.pack_keys(call.key.detach()), batch.pack_keys(call.value.detach())
        with torch.no_grad(), on_device(call.device):
            out, lse = gen.varlen_forward(q, k, v, batch.packing, call.scale, causal, mods)
        out = batch.unpack_queries(out, call.value_dim)
        lse = normalize_lse(batch.lse_from_kernel(lse), call.q_len)
        out, lse = batch.zero_empty_rows(out, lse)
        if call.sinks is not None and mods.sinks is None:
            return add_sinks(out, lse, call.sinks)
        return out, lse

    def backward(self, call, dout, out, lse):
        batch = PaddedBatch.from_call(call, self.head_dim_multiple(call, backward=True))
        if batch.total_k == 0:
            return torch.zeros_like(call.query), torch.zeros_like(call.key), torch.zeros_like(call.value)
        gen = self.generation()
        q, o, do = (batch.pack_queries(t.detach().to(call.dtype)) for t in (call.query, out, dout))
        k, v = batch.pack_keys(call.key.detach()), batch.pack_keys(call.value.detach())
        causal, mods = kernel_mods(call, sinks=False)  # `lse` holds the sinks: all the q/k/v gradients need
        with torch.no_grad(), on_device(call.device):
            dq, dk, dv = gen.varlen_backward(do, q, k, v, o, batch.lse_to_kernel(lse.detach()), batch.packing,
                                             call.scale, causal, deterministic_algorithms(), mods)
        dq = batch.zero_empty_rows(batch.unpack_queries(dq, call.head_dim))[0]
        return dq, batch.unpack_keys(dk, call.head_dim), batch.unpack_keys(dv, call.value_dim)

    def packed_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, scale: float,
                         causal: bool, mods: KernelMods = NO_MODS) -> torch.Tensor:
        """One varlen kernel call on packed (total, H, D) tensors, with the library's autograd (flash-attn's
        causal alignment: bottom-right) and `mods` as the kernels take them. The packed API's arguments are
        checked by its caller (cpattn.packed)."""
        gen = self.generation()
        with on_device(q.device):
            out = gen.varlen_function(align_head_dim(q), align_head_dim(k), align_head_dim(v), packing, scale,
                                      causal, 0.0, deterministic_algorithms(), mods)
        return out[..., : v.shape[-1]]


def _modified(call: AttentionCall) -> bool:
    return call.window is not None or call.softcap is not None or call.sinks is not None


def _capability(call: AttentionCall) -> tuple[int, int] | None:
    return device_capability(call.device) if call.device.type == "cuda" else None


def sinks_through_lse(provider: Provider, call: AttentionCall) -> torch.Tensor:
    """`call` on `provider` with its sinks joining through the log-sum-exp (cpattn/ops/sinks.py): for a
    generation without a sink argument, or a kernel that lacks them for this call."""
    plain = call.replace(sinks=None)
    if wants_grad(call):
        return scoremods.SinksThroughLse.apply(provider, plain, call.query, call.key, call.value, call.sinks)
    with torch.no_grad():
        out, lse = provider.forward(plain)
    return add_sinks(out, lse, call.sinks)[0]


def make_providers() -> list[Provider]:
    return [Flash(), FlashVarlen()]
