"""A call's window, softcap and sinks as FlashAttention's kernels take them.

Windows
    A call's window is top-left aligned: query i sees key j iff i - left <= j <= i + right, and is_causal folds in
    as right <= 0 (`contract.band`). FlashAttention aligns windows and causal masks to the bottom-right corner:
    window_size (L, R) lets query i see key j iff i + d - L <= j <= i + d + R, with d = kv_len - q_len. So the
    band (left, right) is the kernels' (left + d, right - d), with their causal flag off. The kernels take no
    negative side: a band whose side turns negative is not expressible and is refused (`window_reasons`); a
    schedule's blocks, cut by `cpattn.ops.window.trim_block`, always are. First, a side that reaches past every
    key becomes unbounded (a window >= the sequence is no window at all), and a band that is then only causal
    runs as the kernels' causal mask: the same keys, and the FA4 sm90 fast paths take it.

Softcap
    Passed as it is: every generation applies c * tanh(s / c) to the scaled scores s before masking, as cpattn
    defines it.

Sinks
    FA4's `learnable_sink` takes one logit per query head, in every row's denominator: its forward returns the
    log-sum-exp with the sink and out 0 on rows without keys (log-sum-exp = the sink there, as cpattn's). Its
    private backward returns the sink's gradient as a fourth value where it takes `learnable_sink`. A backward
    that is handed the log-sum-exp with the sinks computes exact q/k/v gradients without them (P = exp(S - lse)
    already holds the sink's share), so the contract backward, which returns no sink gradient, never passes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...contract import AttentionCall, band

Window = "tuple[int | None, int | None]"


@dataclass(frozen=True)
class KernelMods:
    """What one kernel call takes besides q, k, v, the scale and its causal flag: the window (bottom-right,
    sides >= 0 or None for unbounded), the softcap and the sink logits (float32 (Hq,)), each None where the call
    has none."""

    window: "Window | None" = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        """No modification: the calls the FA4 sm90 fast paths take."""
        return self.window is None and self.softcap is None and self.sinks is None

    @property
    def plain_scores(self) -> bool:
        """No window and no softcap: every score of the kernels' own causal or full mask, as they compute it
        without modifications (sinks only change the log-sum-exp, which a backward is handed)."""
        return self.window is None and self.softcap is None

    def kwargs(self, unbounded, sinks: bool = True) -> dict:
        """The bound functions' keywords for the modifications the call has (binding.FEATURES), none for those it
        lacks (the libraries' defaults switch them off); `unbounded` is the generation's value for a window side
        without a bound (-1 for FA2/FA3, None for FA4); the sinks only with `sinks`."""
        out = {}
        if self.window is not None:
            out["window"] = tuple(unbounded if side is None else side for side in self.window)
        if self.softcap is not None:
            out["softcap"] = self.softcap
        if sinks and self.sinks is not None:
            out["learnable_sink"] = self.sinks
        return out


NO_MODS = KernelMods()


def _kernel_sides(call: AttentionCall) -> "Window":
    """`call`'s band as the kernels' bottom-right (L, R) (see `band_sides`)."""
    return band_sides(band(call), call.q_len, call.kv_len)


def band_sides(band_: "Window", q_len: int, kv_len: int) -> "Window":
    """A top-left band (left, right) of a (q_len x kv_len) call as the kernels' bottom-right (L, R), sides that
    reach past every key made unbounded first; a side may come out negative (not expressible)."""
    left, right = band_
    if left is not None and left >= q_len - 1:
        left = None  # row q_len - 1 reaches key 0: so do all the others
    if right is not None and right >= kv_len - 1:
        right = None  # row 0 reaches the last key: so do all the others
    shift = kv_len - q_len
    return (None if left is None else left + shift), (None if right is None else right - shift)


def kernel_window(call: AttentionCall) -> "tuple[bool, Window | None] | None":
    """(causal, window) the kernels take for `call` (see the module docstring), or None when its band has a
    side they cannot take. A call without a window keeps its causal flag."""
    if call.window is None:
        return call.is_causal, None
    return band_window(band(call), call.q_len, call.kv_len)


def band_window(band_: "Window", q_len: int, kv_len: int) -> "tuple[bool, Window | None] | None":
    """(causal, window) the kernels take for the top-left band `band_` of a (q_len x kv_len) call, or None when
    it has a side they cannot take (see the module docstring)."""
    low, high = band_sides(band_, q_len, kv_len)
    if (low is not None and low < 0) or (high is not None and high < 0):
        return None
    if low is None and high is None:
        return False, None
    if low is None and high == 0:
        return True, None
    return False, (low, high)


def kernel_mods(call: AttentionCall, sinks: bool = True) -> tuple[bool, KernelMods]:
    """(causal, modifications) of `call` as one kernel call takes them (`window_reasons` says when it cannot);
    the sinks only with `sinks` (where the generation takes them), as float32 logits that keep their graph."""
    causal, window = kernel_window(call)
    logits = call.sinks.float().contiguous() if sinks and call.sinks is not None else None
    if window is None and call.softcap is None and logits is None:
        return causal, NO_MODS
    return causal, KernelMods(window, call.softcap, logits)


def window_reasons(call: AttentionCall) -> list[str]:
    """Why `call`'s band cannot reach the kernels (a side they would need negative), in words."""
    if call.window is None or kernel_window(call) is not None:
        return []
    causal = " with is_causal" if call.is_causal else ""
    return [f"window={call.window}{causal} on q_len {call.q_len}, kv_len {call.kv_len}: FlashAttention aligns "
            f"windows to the bottom-right corner, where this band is window_size {_kernel_sides(call)}, and it "
            "takes no negative side (a block cut by cpattn.ops.window.trim_block always fits)"]


def wants_grad(call: AttentionCall) -> bool:
    """Whether a gradient flows to q, k, v or the sinks."""
    return call.needs_grad or (call.sinks is not None and call.sinks.requires_grad and torch.is_grad_enabled())
