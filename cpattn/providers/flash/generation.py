"""What every FlashAttention generation offers the providers, and the buffer backward FA2 and FA3 share.

A `Generation` holds the entry points of one library generation, bound for the dense or the varlen provider.
Its kernel methods take (B, S, H, D) tensors (varlen: (total, H, D)) whose head dims are already aligned, and
return the library's raw results (its LSE convention, its layouts); the providers (adapters.py) convert.

Score modifications reach them as `mods` (score_mods.KernelMods: the window already bottom-right, as the
kernels take it), passed by parameter name (binding.FEATURES). Windows and softcaps are native wherever the
generation's functions have the parameters; where one lacks them, `feature_reasons` refuses such calls, naming
the generation and the parameter. Sinks are native only where `takes_sinks` (FA4 with a sink gradient); elsewhere
they enter through the log-sum-exp (cpattn/scoremods.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch

from ...contract import HALF_DTYPES, AttentionCall, Capabilities
from .._libs import STANDIN_DEVICES_ATTR
from .binding import BoundFunction, first_output
from .layout import HEAD_DIM_ALIGN, Packing
from .score_mods import NO_MODS, KernelMods

if TYPE_CHECKING:
    from .fa4_sm90_backward import Sm90BackwardKernels


class Generation:
    """The entry points of one FlashAttention generation (see the module docstring)."""

    title: ClassVar[str]
    label: ClassVar[str]  # how Availability.version names it

    # What a subclass provides.
    max_head_dim: ClassVar[int] = 256
    extra_notes: ClassVar[tuple[str, ...]] = ()
    min_compute_capability: ClassVar[tuple[int, int]] = (8, 0)
    has_dropout: ClassVar[bool] = False
    unbounded: ClassVar[Any] = -1  # a window side without a bound, as the library spells it
    empty_row_lse: ClassVar[float] = float("inf")  # the log-sum-exp the kernels write for a row that sees no key
    _public_function: BoundFunction  # the public autograd function (dense or varlen), bound by the subclass
    _private_forward: BoundFunction
    _private_backward: BoundFunction

    def __init__(self, version: str, modules: Sequence[Any], varlen: bool):
        self.version = version
        self.varlen = varlen
        self.standin_devices = tuple(
            sorted({d for m in modules for d in getattr(m, STANDIN_DEVICES_ATTR, ())})
        )

    def capabilities(self) -> Capabilities:
        notes = [
            f"backed by {self.title} {self.version}",
            "is_causal needs q_len == kv_len (flash-attn aligns causal masks to the bottom-right corner)",
            "value head dim must equal the query head dim",
            "backward is deterministic only under torch.use_deterministic_algorithms(True)",
        ]
        if self.varlen:
            notes.append("key-padding masks become cu_seqlens; is_causal cannot be combined with a mask")
        notes += self.extra_notes
        notes += self._mod_notes()
        if self.standin_devices:
            notes.append(f"STAND-IN library: also accepts {', '.join(self.standin_devices)} (adapter tests only)")
        return Capabilities(
            dtypes=HALF_DTYPES, max_head_dim=self.max_head_dim, min_compute_capability=self.min_compute_capability,
            causal=True, key_padding_mask=self.varlen, varlen=self.varlen, dropout=self.has_dropout, gqa=True,
            backward=True, training=True, deterministic_backward=False, notes=tuple(notes),
            row_views=not self.varlen,  # (B, S, H, D) views with any row offset; varlen packing would copy
            window=self.missing("window") is None, softcap=self.missing("softcap") is None,
            sinks=self.takes_sinks(),
        )

    # -- score modifications ----------------------------------------------------------------------------------
    def _functions(self) -> tuple[BoundFunction, ...]:
        """The functions a modification must reach: the contract's forward and backward, the public function."""
        return self._private_forward, self._private_backward, self._public_function

    def missing(self, feature: str) -> str | None:
        """Why this generation cannot take `feature` (binding.FEATURES), naming it and the parameter its first
        function without it lacks; None where every function takes it."""
        lacking = next((fn for fn in self._functions() if not fn.takes(feature)), None)
        return None if lacking is None else f"{self.title} {self.version}: {lacking.lacks(feature)}"

    def takes_sinks(self) -> bool:
        """Whether sinks are native: the forwards take them and the backward gives their gradient. Generations
        without a sink argument (FA2, FA3) say no: sinks then enter through the log-sum-exp."""
        return False

    def native_sinks(self, call: AttentionCall, compute_capability: tuple[int, int] | None) -> bool:
        """Whether `call`'s sinks go to this kernel on the single-device path (else through its log-sum-exp, in
        the provider): `takes_sinks`, unless the kernel lacks them for this call."""
        return self.takes_sinks()

    def feature_reasons(self, call: AttentionCall) -> list[str]:
        """Why this generation's functions cannot take `call`'s window or softcap (the parameter they lack)."""
        out = []
        for feature, value in (("window", call.window), ("softcap", call.softcap)):
            reason = self.missing(feature) if value is not None else None
            if reason is not None:
                out.append(f"{feature}={value} is not supported: {reason}")
        return out

    def _mod_notes(self) -> list[str]:
        notes = []
        if self.missing("window") is None:
            notes.append("window=(left, right) natively (FlashAttention aligns windows to the bottom-right corner: "
                         "a band reaches it shifted by kv_len - q_len, and one whose side would turn negative is "
                         "refused)")
        if not self.takes_sinks():
            notes.append("sinks through the log-sum-exp (its kernels have no sink argument)")
        return notes

    def _mods(self, mods: KernelMods, sinks: bool = True) -> dict:
        return mods.kwargs(self.unbounded, sinks)

    def limits(self, call: AttentionCall, compute_capability: tuple[int, int]) -> list[str]:
        """Generation-specific reasons a CUDA call cannot run (beyond its Capabilities)."""
        return []

    def backward_head_dim_multiple(self, compute_capability: tuple[int, int] | None) -> int:
        """The multiple the head dims are padded to when the backward kernel runs (HEAD_DIM_ALIGN unless a
        generation's backward is wrong at other head dims); `compute_capability` None off CUDA."""
        return HEAD_DIM_ALIGN

    def forward_head_dim_multiple(self, compute_capability: tuple[int, int] | None, head_dim: int) -> int:
        """The multiple `head_dim` is padded to when only the forward kernel runs (HEAD_DIM_ALIGN unless a
        generation's forward is faster on a wider head dim)."""
        return HEAD_DIM_ALIGN

    def row_backward_kernels(self) -> "Sm90BackwardKernels | None":
        """The kernels a ring rank's backward can launch one by one around one dQ accumulator
        (fa4_sm90_backward), or None: then each ring step runs the whole backward."""
        return None

    def shared_varlen_backward(self, dout, q, out, lse, frame: Packing, scale, causal):
        """One dQ accumulator over a packed ring rank's rows, `frame` its sequences
        (fa4_sm90_backward.SharedVarlenAccumulator), or None: then each step's varlen call runs its whole
        backward."""
        return None

    # `mods` (score_mods.KernelMods): the call's window, softcap and sinks as the kernels take them. The backward
    # kernels are handed the log-sum-exp with the sinks, which is all their q/k/v gradients need of them.
    def forward(self, q, k, v, scale, causal, mods: KernelMods = NO_MODS):
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, scale, causal, deterministic, mods: KernelMods = NO_MODS):
        raise NotImplementedError

    def varlen_forward(self, q, k, v, packing: Packing, scale, causal, mods: KernelMods = NO_MODS):
        raise NotImplementedError

    def varlen_backward(self, dout, q, k, v, out, lse, packing: Packing, scale, causal, deterministic,
                        mods: KernelMods = NO_MODS):
        raise NotImplementedError

    def varlen_function(self, q, k, v, packing: Packing, scale, causal, dropout_p, deterministic,
                        mods: KernelMods = NO_MODS):
        """The public varlen autograd function (sinks with their gradient where `takes_sinks`)."""
        return first_output(self._public_function(
            q=q, k=k, v=v, **packing.kwargs(), **self._function_options(scale, causal, dropout_p, deterministic),
            **self._mods(mods)))

    def function(self, q, k, v, scale, causal, dropout_p, deterministic, mods: KernelMods = NO_MODS):
        """The public autograd function; dropout_p > 0 only reaches generations with has_dropout; sinks (with
        their gradient) only where `takes_sinks`."""
        options = self._function_options(scale, causal, dropout_p, deterministic)
        return first_output(self._public_function(q=q, k=k, v=v, **options, **self._mods(mods)))

    def function_of_qkv(self, scale, causal, dropout_p, deterministic) -> Callable:
        """`function` with everything but q, k and v bound once, for a cached runner."""
        kernel = self._public_function.partial(**self._function_options(scale, causal, dropout_p, deterministic))
        return lambda q, k, v: first_output(kernel(q=q, k=k, v=v))

    def inference_of_qkv(self, scale, causal) -> Callable:
        """For calls that need no gradient and no dropout: the cheapest call of the same kernel on (q, k, v),
        everything else bound once. Here the public function; a generation may skip its autograd wrapper."""
        return self.function_of_qkv(scale, causal, 0.0, False)

    def training_of_bhsd(self, scale, causal, deterministic) -> Callable | None:
        """For calls that need gradients, without dropout: a function of (B, H, S, D) q, k, v that runs the same
        kernels as the public function as one autograd node; None where the public function stays."""
        return None

    def _function_options(self, scale, causal, dropout_p, deterministic) -> dict:
        """The public function's keywords besides q, k, v (generations without dropout take none)."""
        return {"softmax_scale": scale, "causal": causal, "deterministic": deterministic}


class BackwardIntoBuffers(Generation):
    """FA2 and FA3 backward kernels write into dq/dk/dv buffers the caller allocates (FA2 <= 2.6 also returns
    them, FA2 >= 2.7 and FA3 return only softmax_d); the buffers keep the layout of q, k, v."""

    backward_extra: ClassVar[dict] = {}
    _private_backward: BoundFunction  # the private backward, bound by the subclass

    def _grads_into_buffers(self, dout, q, k, v, out, lse, scale, causal, deterministic, mods, **varlen):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._private_backward(
            dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv, **varlen, **self.backward_extra,
            softmax_scale=scale, causal=causal, deterministic=deterministic, **self._mods(mods, sinks=False),
        )
        return dq, dk, dv

    def backward(self, dout, q, k, v, out, lse, scale, causal, deterministic, mods=NO_MODS):
        return self._grads_into_buffers(dout, q, k, v, out, lse, scale, causal, deterministic, mods)

    def varlen_backward(self, dout, q, k, v, out, lse, packing, scale, causal, deterministic, mods=NO_MODS):
        return self._grads_into_buffers(dout, q, k, v, out, lse, scale, causal, deterministic, mods,
                                        **packing.kwargs())
