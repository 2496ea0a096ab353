"""FlashAttention-3: module ``flash_attn_interface`` (built from flash-attention/hopper), sm90.

One private forward/backward pair serves both layouts (cu_seqlens None is the dense case); the public
flash_attn[_varlen]_func runs calls with the library's own autograd. Windows (`window_size_left`/`_right` in the
private functions, a `window_size` pair in the public ones; -1 is an unbounded side) and softcaps reach all of
them by parameter name. FA3 has no sinks.
"""

from __future__ import annotations

from .binding import bind, distribution_version, import_library
from .generation import BackwardIntoBuffers
from .layout import VARLEN_ARGS
from .score_mods import NO_MODS


class FlashAttention3(BackwardIntoBuffers):
    """flash_attn_interface (hopper/): _flash_attn_forward/_backward (dense and varlen) and public functions."""

    title, label = "FlashAttention-3", "flash-attn-3"
    min_compute_capability = (9, 0)
    api_name = "flash_attn_interface"

    @classmethod
    def load(cls, varlen: bool) -> "FlashAttention3":
        api = import_library(cls.title, cls.api_name)
        version = (getattr(api, "__version__", None) or distribution_version("flash-attn-3", "flash_attn_3")
                   or "unknown")
        return cls(version, (api,), varlen)

    def __init__(self, version, modules, varlen):
        super().__init__(version, modules, varlen)
        api = modules[0]
        bound = lambda name, needs: bind(self.title, api, self.api_name, name, needs,  # noqa: E731
                                         features=("window", "softcap"))
        grads = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv")
        self._private_forward = bound("_flash_attn_forward", ("q", "k", "v", *VARLEN_ARGS, "softmax_scale", "causal"))
        self._private_backward = bound(
            "_flash_attn_backward",
            (*grads, *VARLEN_ARGS, "softmax_scale", ("causal", "is_causal"), "deterministic"),
        )
        if varlen:
            self._public_function = bound("flash_attn_varlen_func",
                                          ("q", "k", "v", *VARLEN_ARGS, "softmax_scale", "causal", "deterministic"))
        else:
            self._public_function = bound("flash_attn_func",
                                          ("q", "k", "v", "softmax_scale", "causal", "deterministic"))

    def limits(self, call, compute_capability):
        if compute_capability[0] != 9:
            sm = "sm%d%d" % compute_capability
            return [f"FlashAttention-3 kernels are built for Hopper (sm90); this GPU is {sm}"]
        return []

    def forward(self, q, k, v, scale, causal, mods=NO_MODS):
        out, lse, *_ = self._private_forward(q=q, k=k, v=v, softmax_scale=scale, causal=causal, **self._mods(mods))
        return out, lse

    def varlen_forward(self, q, k, v, packing, scale, causal, mods=NO_MODS):
        out, lse, *_ = self._private_forward(q=q, k=k, v=v, **packing.kwargs(), softmax_scale=scale, causal=causal,
                                             **self._mods(mods))
        return out, lse
