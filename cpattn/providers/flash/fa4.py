"""FlashAttention-4: ``flash_attn.cute`` (``pip install flash-attn-4``), CuTe-DSL kernels, sm90/sm100.

Public and private entry points
    The public `flash_attn.cute.flash_attn_func` / `flash_attn_varlen_func` run every call that wants the
    library's own autograd (`function`, `varlen_function`, a shape's first dispatch). The contract's `backward`
    takes an external (out, lse), which no public function does: it calls the private `_flash_attn_bwd`, bound
    by parameter name (binding.py). Everything else that calls the private `_flash_attn_fwd` does so only for
    host time, on the same kernel: the contract's `forward` (the public functions return the log-sum-exp too,
    but through their autograd.Function, which costs more host time than the launch at small shapes and which a
    ring would pay per step), calls without gradients (`inference_of_qkv`, for the same reason) and training
    calls (`training_of_bhsd`: on transpose views the public function is five autograd nodes, `_TransposedFlash`
    one).

sm90 fast paths
    On Hopper, inside the checked release window (fa4_release_window, override CPATTN_FA4_FAST_PATHS), dense
    forwards launch the compiled forward kernel directly (fa4_sm90_forward), one call's backward launches the
    three backward kernels itself, and a ring rank keeps one dQ accumulator over its steps (fa4_sm90_backward).
    Varlen calls (`flash_varlen`) launch the same kernels with their cu_seqlens, forward and backward, on the
    releases whose varlen launches passed their GPU check (fa4_release_window.VARLEN_CHECKED_RELEASES).
    Both exist only for host time: the kernels and their arguments are the library's. `fast_path_status` says
    which path runs and why.

Score modifications
    Windows (`window_size_left`/`_right` in the private functions, a `window_size` pair in the public ones; None
    is an unbounded side), softcaps and sinks (`learnable_sink`) reach the library's functions by parameter name.
    Sinks are native only where `_flash_attn_bwd` takes `learnable_sink`: it then returns their gradient as a
    fourth value (4.0.0b36: `return (dq, dk, dv) if learnable_sink is None else (dq, dk, dv, dsink)`, dsink from
    its postprocess kernel, -sum exp(sink - lse) * rowsum(dO * O)), and the public function's backward hands it
    on. The sm90 fast paths are compiled without window, softcap and sink: calls with any of them run the
    library's functions (a backward only for a window or softcap: it is handed the log-sum-exp with the sinks).

Head dims on sm90
    The library's sm90 backward gives wrong gradients at head dims that are not multiples of 32, so with
    gradients they are zero-padded to one; its forward at head dim 104 is far slower than at 128, so 97 to 104
    are padded to 128 for the forward too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from . import fa4_release_window, fa4_sm90_backward, fa4_sm90_forward
from .autograd_node import transposed_training
from .binding import bind, distribution_version, import_library
from .generation import Generation
from .layout import HEAD_DIM_ALIGN, VARLEN_ARGS
from .score_mods import NO_MODS


class FlashAttention4(Generation):
    """flash_attn.cute: interface._flash_attn_fwd/_flash_attn_bwd and the public functions."""

    title, label = "FlashAttention-4", "flash-attn-4"
    min_compute_capability = (9, 0)
    unbounded = None
    empty_row_lse = float("-inf")  # the contract's own: no fix-up needed
    extra_notes = ("with gradients on sm90, head dims are zero-padded to a multiple of 32 (the library's sm90 "
                   "backward gave wrong gradients at 16, 48, 72, 80 and 112)",
                   "on sm90, head dims 97 to 104 are zero-padded to 128 for the forward too (1.5 to 1.75x faster)")
    api_name = "flash_attn.cute.interface"
    public_name = "flash_attn.cute"

    @classmethod
    def load(cls, varlen: bool) -> "FlashAttention4":
        public = import_library(cls.title, cls.public_name)
        api = import_library(cls.title, cls.api_name)
        version = getattr(public, "__version__", None)
        if version in (None, "0.0.0"):  # its __init__ asks metadata for a name that varies between releases
            version = distribution_version("flash-attn-4", "fa4", "flash-attn-cute") or "unknown"
        return cls(version, (public, api), varlen)

    def __init__(self, version, modules, varlen):
        super().__init__(version, modules, varlen)
        public, api = modules
        extra = VARLEN_ARGS if varlen else ()
        features = ("window", "softcap", "learnable_sink")
        self._private_forward = bind(self.title, api, self.api_name, "_flash_attn_fwd",
                                     ("q", "k", "v", *extra, "softmax_scale", "causal", "return_lse"),
                                     features=features)
        self._private_backward = bind(self.title, api, self.api_name, "_flash_attn_bwd",
                                      ("q", "k", "v", "out", "dout", "lse", *extra, "softmax_scale", "causal"),
                                      optional=("deterministic",), features=features)
        name = "flash_attn_varlen_func" if varlen else "flash_attn_func"
        self._public_function = bind(self.title, public, self.public_name, name,
                                     ("q", "k", "v", *extra, "softmax_scale", "causal"), optional=("deterministic",),
                                     features=features)
        self._load_fast_paths(api)  # after the bindings: a release they refuse gets no fast-path warning
        self.sm90_varlen_backward = sm90_backward_takes_cu_seqlens(api)

    def _load_fast_paths(self, api) -> None:
        """The sm90 fast paths of a real library (never a stand-in): dense for `flash`, varlen for `flash_varlen`."""
        self.fast_path_verdict = fa4_release_window.verdict(self.version)
        self._missing_fast_path_names = sorted(set(fa4_sm90_forward.missing_interface_names(api))
                                               | set(fa4_sm90_backward.missing_interface_names(api)))
        real = not self.standin_devices
        dense_real = not self.varlen and real
        self._direct_forward = fa4_sm90_forward.Sm90Forward.load(api, self.version) if dense_real else None
        self._backward_kernels = (fa4_sm90_backward.Sm90BackwardKernels.load(api, self.version) if dense_real
                                  else None)
        # varlen calls (flash_varlen: packed documents, a packed ring's chains) launch the same kernels with
        # cu_seqlens; the dense paths above stay the `flash` provider's
        varlen_real = self.varlen and real and fa4_release_window.varlen_allows(self.version)
        self._varlen_forward = fa4_sm90_forward.Sm90Forward.load(api, self.version) if varlen_real else None
        self._varlen_kernels = (fa4_sm90_backward.Sm90BackwardKernels.load(api, self.version) if varlen_real
                                else None)
        self._shared_varlen = (self._varlen_kernels is not None
                               and fa4_release_window.shared_varlen_allows(self.version))
        if self._varlen_forward is not None:
            self.extra_notes = self.extra_notes + (
                "on sm90, varlen forwards and backwards at head dims 64 and 128 (Hq == Hkv for the backward; no "
                "window, softcap or sinks) launch the library's compiled kernels directly, without its per-call "
                "Python",)
        if self._direct_forward is not None:
            self.extra_notes = self.extra_notes + (
                "on sm90, dense forwards and one call's backward (Hq == Hkv) launch the library's compiled kernels "
                "directly, without its per-call Python",)
        if self._backward_kernels is not None:
            self.extra_notes = self.extra_notes + (
                "under ring attention on sm90, one float32 dQ accumulator per rank for all steps (Hq == Hkv, "
                "unpadded head dims)",)

    def limits(self, call, compute_capability):
        out = []
        hopper = compute_capability[0] == 9
        if hopper and self.varlen and call.needs_grad and not self.sm90_varlen_backward:
            out.append(f"FlashAttention-4 {self.version} has no varlen backward on Hopper (sm90): its sm90 backward "
                       "kernel takes no cu_seqlens; use FlashAttention-2 or -3, or a release whose sm90 backward does")
        if hopper and call.needs_grad and torch.are_deterministic_algorithms_enabled():
            out.append("FlashAttention-4 has a deterministic backward only on sm100/sm110")
        if call.softcap is not None and call.needs_grad and _dedicated_hd256_backward(call, compute_capability):
            out.append("FlashAttention-4's sm100 backward at head dim 256 has no softcap")
        return out

    def takes_sinks(self):
        return all(fn.takes("learnable_sink") for fn in self._functions())

    def native_sinks(self, call, compute_capability):
        # The library's dedicated sm100 backward at head dim 256 asserts learnable_sink is None: there the sinks
        # go through the log-sum-exp, which needs no sink argument.
        grads = call.sinks is not None and (call.needs_grad or call.sinks.requires_grad)
        dedicated = compute_capability is not None and _dedicated_hd256_backward(call, compute_capability)
        return self.takes_sinks() and not (grads and dedicated)

    def _mod_notes(self):
        notes = super()._mod_notes()
        if self.takes_sinks():
            notes.append("sinks natively (learnable_sink), with their gradient from the library's backward")
        elif self.missing("learnable_sink") is not None:
            notes[-1] = f"sinks through the log-sum-exp ({self.missing('learnable_sink')})"
        return notes

    def row_backward_kernels(self):
        return self._backward_kernels

    def backward_head_dim_multiple(self, compute_capability):
        # The library's sm90 backward gives dQ/dK/dV far off at head dims 16, 48, 72 and 80 (its forward is right
        # there) and matches float64 at multiples of 32, with the public function too. Padded with zero columns to
        # a multiple of 32 the gradients are exact, at the cost of the padded columns' FLOPs.
        return 32 if compute_capability is not None and compute_capability[0] == 9 else HEAD_DIM_ALIGN

    def forward_head_dim_multiple(self, compute_capability, head_dim):
        # The library's sm90 forward at head dim 104 is much slower than the same call zero-padded to 128, which
        # also beats cuDNN there. Head dims 97 to 103 run at 104 after alignment. At 80, 112 and 120 the padded
        # kernel gains less than the copy that pads costs, or loses: those keep the alignment of 8.
        hopper = compute_capability is not None and compute_capability[0] == 9
        return 32 if hopper and -(-head_dim // HEAD_DIM_ALIGN) * HEAD_DIM_ALIGN == 104 else HEAD_DIM_ALIGN

    # _flash_attn_fwd returns (out, lse, ...) and _flash_attn_bwd (dq, dk, dv, ...); newer releases add trailing
    # values (p, row_max, o_lo / dqv, dsink), so keep only the leading ones.
    def forward(self, q, k, v, scale, causal, mods=NO_MODS):
        direct = self._direct_forward
        if direct is not None and mods.plain and direct.can_launch(q, k, v):
            return direct(q, k, v, scale, causal, return_lse=True)
        return tuple(self._private_forward(q=q, k=k, v=v, softmax_scale=scale, causal=causal, return_lse=True,
                                           **self._mods(mods))[:2])

    def varlen_forward(self, q, k, v, packing, scale, causal, mods=NO_MODS):
        direct = self._varlen_forward
        if direct is not None and mods.plain and direct.can_launch_varlen(q, k, v, packing):
            return direct.launch_varlen(q, k, v, packing, scale, causal)
        # the private forward, as `forward`: the public varlen function gives the LSE only through its autograd
        return tuple(self._private_forward(q=q, k=k, v=v, **packing.kwargs(), softmax_scale=scale, causal=causal,
                                           return_lse=True, **self._mods(mods))[:2])

    def inference_of_qkv(self, scale, causal):
        # flash_attn_func runs this same forward (return_lse=False) inside an autograd.Function, whose Python
        # costs more host time than the kernel launch at small shapes: without gradients, call it directly,
        # and where fa4_sm90_forward takes the tensors, without _flash_attn_fwd's Python too.
        forward = self._private_forward.partial(softmax_scale=scale, causal=causal, return_lse=False)
        direct = self._direct_forward
        if direct is None:
            return lambda q, k, v: forward(q=q, k=k, v=v)[0]
        return lambda q, k, v: (direct(q, k, v, scale, causal, return_lse=False)[0] if direct.can_launch(q, k, v)
                                else forward(q=q, k=k, v=v)[0])

    def backward(self, dout, q, k, v, out, lse, scale, causal, deterministic, mods=NO_MODS):
        kernels = self._backward_kernels  # the same three launches without _flash_attn_bwd's per-call Python
        if kernels is not None and not deterministic and mods.plain_scores and kernels.can_launch_backward(q, k, v):
            return kernels.launch_backward(q, k, v, out, dout, lse, scale, causal)
        return tuple(self._private_backward(q=q, k=k, v=v, out=out, dout=dout, lse=lse, softmax_scale=scale,
                                            causal=causal, deterministic=deterministic,
                                            **self._mods(mods, sinks=False))[:3])

    def training_of_bhsd(self, scale, causal, deterministic):
        # The public function on transpose views is five autograd nodes (its own and four transposes); through
        # _TransposedFlash it is one. At small shapes FA4's calls are host-bound, so that bookkeeping counts.
        return transposed_training(
            lambda q, k, v: self.forward(q, k, v, scale, causal),
            lambda dout, q, k, v, out, lse: self.backward(dout, q, k, v, out, lse, scale, causal, deterministic),
        )

    def varlen_backward(self, dout, q, k, v, out, lse, packing, scale, causal, deterministic, mods=NO_MODS):
        kernels = self._varlen_kernels
        if (kernels is not None and not deterministic and mods.plain_scores
                and kernels.can_launch_varlen_backward(q, k, v, packing)):
            return kernels.launch_varlen_backward(q, k, v, out, dout, lse, packing, scale, causal)
        return tuple(self._private_backward(q=q, k=k, v=v, out=out, dout=dout, lse=lse, **packing.kwargs(),
                                            softmax_scale=scale, causal=causal, deterministic=deterministic,
                                            **self._mods(mods, sinks=False))[:3])

    def shared_varlen_backward(self, dout, q, out, lse, frame, scale, causal):
        if not self._shared_varlen:  # off until its GPU check passes on this release (fa4_release_window)
            return None
        return fa4_sm90_backward.shared_varlen_accumulator(self._varlen_kernels, q, dout, out, lse, frame, scale,
                                                           causal)

    def fast_path_status(self) -> "FastPathStatus":
        """Which path this generation's dense sm90 calls take, and why (see `fast_path_status`)."""
        if self.standin_devices:
            return FastPathStatus(False, "the flash-attn-4 module is a test stand-in")
        verdict = self.fast_path_verdict
        if not verdict.enabled:
            return FastPathStatus(False, verdict.reason)
        if self.varlen and self._varlen_forward is None:
            return FastPathStatus(False, f"{verdict.reason}; varlen: {fa4_release_window.varlen_reason(self.version)}")
        loaded = any(path is not None for path in (self._direct_forward, self._backward_kernels,
                                                   self._varlen_forward, self._varlen_kernels))
        launches = FastPathStatus.launches
        if self.varlen:
            shared = fa4_release_window.shared_varlen_reason(self.version)
            launches = ("varlen forward and backward; packed ring's dQ accumulator per rank: "
                        + ("on" if self._shared_varlen else "off") + f" ({shared})")
        if self._missing_fast_path_names:  # each fast path loads only where the interface has what it reads
            lacks = ", ".join(self._missing_fast_path_names)
            return FastPathStatus(loaded, f"{verdict.reason}, but flash_attn.cute.interface lacks {lacks} (the fast "
                                          "paths that read them are off)", launches)
        return FastPathStatus(loaded, verdict.reason, launches)


def sm90_backward_takes_cu_seqlens(api) -> bool:
    """Whether the library's sm90 backward kernel (flash_attn.cute's FlashAttentionBackwardSm90) takes
    cu_seqlens, i.e. whether this release has a varlen backward on Hopper; False where it cannot be told."""
    kernel = getattr(api, "FlashAttentionBackwardSm90", None)
    try:
        params = inspect.signature(kernel.__call__).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return "mCuSeqlensQ" in params and "mCuSeqlensK" in params


def _dedicated_hd256_backward(call, compute_capability) -> bool:
    """Whether the library's backward runs its dedicated sm100/sm110 kernel for head dims 256 (aligned), which
    takes neither softcap nor learnable_sink (its default; FLASH_ATTENTION_HD256_GENERIC_BWD=1 avoids it, which
    cpattn does not count on)."""
    aligned = -(-max(call.head_dim, call.value_dim) // HEAD_DIM_ALIGN) * HEAD_DIM_ALIGN
    return compute_capability[0] in (10, 11) and aligned == 256


@dataclass(frozen=True)
class FastPathStatus:
    """Whether FA4's sm90 fast paths run (`active`) and why (`reason`)."""

    active: bool
    reason: str
    launches: str = "forward, one call's backward, one dQ accumulator per ring rank"  # what runs directly

    def __str__(self) -> str:
        if self.active:
            return f"direct kernel launches on sm90 ({self.launches}): {self.reason}"
        return f"the library's functions: {self.reason}"


def fast_path_status(provider) -> FastPathStatus:
    """Which FA4 path a flash provider (`flash`: dense calls, `flash_varlen`: varlen calls) runs on sm90 here,
    and why."""
    availability = provider.availability()
    if not availability.ok:
        return FastPathStatus(False, f"provider '{provider.name}' is not available")
    generation = provider.generation()
    if not isinstance(generation, FlashAttention4):
        return FastPathStatus(False, f"provider '{provider.name}' runs {generation.title} {generation.version}")
    status = generation.fast_path_status()
    if status.active and not fa4_release_window.sm90_visible():
        return FastPathStatus(True, f"{status.reason} (no sm90 GPU is visible here, so none runs now)")
    return status
