"""FlashAttention-2: ``flash_attn`` >= 2.6.3 (``pip install flash-attn``), sm80 and newer.

Module flash_attn.flash_attn_interface: the private _flash_attn[_varlen]_forward/_backward for the contract's
forward (it needs the LSE) and backward (it takes an external out and LSE), the public flash_attn[_varlen]_func
for calls with the library's own autograd and dropout. Windows and softcaps reach all of them by parameter name:
`window_size` pairs in the public functions and in the private ones of 2.6, `window_size_left`/`_right` in the
private ones from 2.7 on (binding.FEATURES); -1 is an unbounded side. FA2 has no sinks.
"""

from __future__ import annotations

from .._libs import parse_version
from .binding import FlashApiError, bind, distribution_version, import_library
from .generation import BackwardIntoBuffers
from .layout import VARLEN_ARGS
from .score_mods import NO_MODS

MIN_FA2_VERSION = parse_version("2.6.3")


class FlashAttention2(BackwardIntoBuffers):
    """flash_attn.flash_attn_interface: _flash_attn[_varlen]_forward/_backward and the public functions."""

    title, label = "FlashAttention-2", "flash-attn-2"
    min_compute_capability = (8, 0)
    has_dropout = True
    backward_extra = {"dropout_p": 0.0}  # contract backward: no dropout (forward() never applies it either)
    api_name = "flash_attn.flash_attn_interface"

    @classmethod
    def load(cls, varlen: bool) -> "FlashAttention2":
        package = import_library(cls.title, "flash_attn")
        api = import_library(cls.title, cls.api_name)
        version = getattr(package, "__version__", None) or distribution_version("flash-attn") or "unknown"
        if version != "unknown" and parse_version(version) < MIN_FA2_VERSION:
            raise FlashApiError(
                f"{cls.title}: flash-attn {version} is older than 2.6.3; "
                "pip install -U 'flash-attn>=2.6.3' --no-build-isolation"
            )
        return cls(version, (package, api), varlen)

    def __init__(self, version, modules, varlen):
        super().__init__(version, modules, varlen)
        api = modules[1]
        kernel = ("dropout_p", "softmax_scale", "causal")
        grads = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv")
        bound = lambda name, needs: bind(self.title, api, self.api_name, name, needs,  # noqa: E731
                                         features=("window", "softcap"))
        if varlen:
            self._private_forward = bound("_flash_attn_varlen_forward", ("q", "k", "v", *VARLEN_ARGS, *kernel))
            self._private_backward = bound("_flash_attn_varlen_backward",
                                           (*grads, *VARLEN_ARGS, *kernel, "deterministic"))
            self._public_function = bound("flash_attn_varlen_func",
                                          ("q", "k", "v", *VARLEN_ARGS, *kernel, "deterministic"))
        else:
            self._private_forward = bound("_flash_attn_forward", ("q", "k", "v", *kernel))
            self._private_backward = bound("_flash_attn_backward", (*grads, *kernel, "deterministic"))
            self._public_function = bound("flash_attn_func", ("q", "k", "v", *kernel, "deterministic"))

    @classmethod
    def _out_lse(cls, result):
        # <= 2.6: (out, q, k, v, out_padded, lse, S_dmask, rng_state); >= 2.7: (out_padded, lse, S_dmask, rng_state)
        if len(result) == 8:
            return result[0], result[5]
        if len(result) == 4:
            return result[0], result[1]
        raise FlashApiError(f"{cls.title}: the forward returned {len(result)} values; cpattn knows 4 and 8")

    def forward(self, q, k, v, scale, causal, mods=NO_MODS):
        return self._out_lse(self._private_forward(q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=causal,
                                                   **self._mods(mods)))

    def varlen_forward(self, q, k, v, packing, scale, causal, mods=NO_MODS):
        return self._out_lse(self._private_forward(q=q, k=k, v=v, **packing.kwargs(), dropout_p=0.0,
                                                   softmax_scale=scale, causal=causal, **self._mods(mods)))

    def _function_options(self, scale, causal, dropout_p, deterministic):
        return {"dropout_p": dropout_p, "softmax_scale": scale, "causal": causal, "deterministic": deterministic}
