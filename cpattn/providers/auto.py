"""`auto`: the fastest provider that can take the call on this device, chosen per input signature.

The order comes from measured kernel throughput (benchmarks/results/, H100, bf16): FlashAttention (FA4/FA3)
ahead of cuDNN, cuDNN ahead of PyTorch's own flash kernel, then the memory-efficient kernel and flex, math
last; one exception, measured: cuDNN goes ahead of FlashAttention for calls of up to 4k keys whose head dim
FlashAttention must zero-pad (PADDED_FLASH_CUDNN_FIRST_UP_TO). Quantised kernels (SageAttention) are never
picked: they change numerics, so they are opt-in only.
A provider is skipped when it cannot take the inputs (mask, dtype, head dim, gradients, architecture), so
`auto` never fails where some provider works, and never silently picks a lossy one. The choice is cached by
input signature and explained by `explain()` (shown by `python -m cpattn info`).

Not modelled: FlashAttention-4's interface is Python, so on small problems (well under a millisecond of GPU
work) its host time per call can set the pace. On one H100 host cuDNN was then faster by up to 1.75x; on
another, with the same code, FA4 stayed ahead in those shapes (benchmarks/results/h100/bench_auto_*.md). A fixed
size threshold was right on one host and wrong on the other, so the order stays fixed by default.

Autotuning (`attention_provider("auto", autotune=True)`) measures instead of assuming: the first call of each
input signature times the first MAX_TIMED providers in the order that take it (forward, or forward+backward when
gradients are needed, on copies of the inputs) and the fastest one runs from then on, this call included;
the first in the order keeps its place unless another is clearly (SWITCH_MARGIN) faster. It is opt-in because that
first call costs tens of milliseconds per candidate and because two hosts may then pick different kernels.
Calls that cannot be timed keep the fixed order: dropout (timing would consume random numbers), CUDA graph
capture, torch.compile tracing, and the context-parallel path (forward/backward with an external LSE), where
each rank must make the same choice without talking to the others.

Score modifications (window, softcap, sinks) pass through `auto` untouched: it chooses among the providers that
take them (natively or through the exact routes, see cpattn/scoremods.py) and hands them to the chosen one, which
applies them as its own declarations say. For a windowed call the providers with native windows come first in the
order (`order`), so a window reaches a kernel that skips the work outside it wherever one takes the call, and
becomes a dense mask only where none does.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch

from .. import scoremods
from ..contract import FLOAT_DTYPES, AttentionCall, Capabilities, Provider
from ..names import auto_order
from ..ops.sinks import add_sinks

# Autotuning times at most this many candidates, the first in ORDER that take the call: it bounds the first
# call's cost (flex compiles for seconds, math materialises the S x S scores), and in the suites under
# benchmarks/results/ no provider further down the order was ever the fastest.
MAX_TIMED = 3
# A candidate replaces the fixed order's first choice only when it measured this much faster. Two timings of one
# kernel on the first call can differ by several percent (on an H100 host cuDNN measured 2% ahead of FA4 at
# S=4k when tuning and 8% behind it in the suite), so a smaller lead is noise, not a reason to switch.
SWITCH_MARGIN = 0.05

# The order comes from cpattn.names.PROVIDER_TABLE (rows marked for a device type, in preference order).
ORDER = {device: auto_order(device) for device in ("cuda", "cpu")}
# `flash` zero-pads some head dims (FA4 on sm90: 97-104 always, others not a multiple of 32 with gradients), a
# copy of q, k and v (and out, dO in the backward) whose cost falls with the sequence's share of the work. On an
# H100 at S = 4k, cuDNN was faster in all 6 padded shapes (2% to 29%), at S = 16k FA4 in all 8 (6% to 14%)
# (benchmarks/results/h100/bench_auto_head_dims_97_127_after.md, bench_auto_padded_dims.md). Up to this many
# keys, a call `flash` pads tries cuDNN first.
PADDED_FLASH_CUDNN_FIRST_UP_TO = 4096


class Auto(Provider):
    name = "auto"
    family = "auto"
    description = "the fastest provider that takes the inputs here (never a quantised one)"
    # window, softcap and sinks: not applied here but passed on whole to the chosen provider (see the module
    # docstring), so that scoremods leaves them to it.
    _caps = Capabilities(
        dtypes=FLOAT_DTYPES, bool_mask=True, additive_mask=True, key_padding_mask=True, dropout=True,
        backward=True, training=True, mask_grad=False, window=True, softcap=True, sinks=True,
        notes=("picks per call: " + " > ".join(ORDER["cuda"]) + " on CUDA (cuDNN first where flash pads the head "
               f"dim and there are at most {PADDED_FLASH_CUDNN_FIRST_UP_TO} keys); " + " > ".join(ORDER["cpu"])
               + " on CPU",),
    )
    supports = {"cpu": _caps, "cuda": _caps}

    def __init__(self, registry: dict[str, Provider], *, autotune: bool = False,
                 measure: "Callable[[Provider, AttentionCall], float] | None" = None):
        """`autotune`: choose by timing (see the module docstring). `measure(provider, call)` gives a
        provider's time in ms for a call (default `measure_ms`; tests pass their own)."""
        super().__init__()
        self._registry = registry
        self.autotune = autotune
        self._measure = measure or measure_ms
        self._choices: dict[tuple, Provider | None] = {}
        self._timings: dict[tuple, dict[str, float | str]] = {}

    def choose(self, call: AttentionCall, **need) -> Provider | None:
        """The provider that runs `call` (None if none takes it): the first in this device's order that has no
        reason to refuse it or, when autotuning, the fastest of those that take it."""
        key = self._key(call, need)
        if key not in self._choices:
            if len(self._choices) > 4096:
                self._choices.clear()
                self._timings.clear()
            if self.autotune and not any(need.values()) and can_time(call):
                self._choices[key] = self._fastest(key, call)
            else:
                self._choices[key] = next(self._takers(call, need), None)
        return self._choices[key]

    @staticmethod
    def _key(call: AttentionCall, need: dict) -> tuple:
        # The window itself, not only whether there is one: a provider's verdict may depend on its sides.
        return (call.device, call.dtype, call.query.shape, call.key.shape, call.value.shape, call.mask_kind,
                None if call.attn_mask is None else tuple(call.attn_mask.shape), call.is_causal,
                call.dropout_p > 0, call.needs_grad, tuple(sorted(k for k, v in need.items() if v)),
                call.window, call.softcap is not None, call.sinks is not None)

    def order(self, call: AttentionCall) -> tuple[str, ...]:
        """The providers tried for `call`, fastest first as measured (ORDER, with cuDNN ahead of `flash` for
        short calls that `flash` would pad: PADDED_FLASH_CUDNN_FIRST_UP_TO); for a windowed call, those with
        native windows first (the others take the window as a dense mask: every score computed)."""
        order = ORDER.get(call.device.type, ())
        flash = self._registry.get("flash")
        if (call.device.type == "cuda" and call.kv_len <= PADDED_FLASH_CUDNN_FIRST_UP_TO and flash is not None
                and flash.availability().ok and flash.pads_head_dim(call)):
            first, second = order.index("flash"), order.index("_native_cudnn")
            order = list(order)
            order[first], order[second] = order[second], order[first]
            order = tuple(order)
        if call.window is not None:  # a window is skipped work only in kernels that have one: those go first
            native = tuple(n for n in order if self._has_windows(n, call.device.type))
            order = native + tuple(n for n in order if n not in native)
        return order

    def _has_windows(self, name: str, device_type: str) -> bool:
        provider = self._registry.get(name)
        caps = None if provider is None else provider.capabilities(device_type)
        return caps is not None and caps.window

    def _takers(self, call: AttentionCall, need: dict):
        """Providers in this call's order with no reason to refuse `call` (lazily: the fixed order stops at
        the first)."""
        return (self._registry[n] for n in self.order(call)
                if n in self._registry and not self._registry[n].reasons(call, **need))

    def _fastest(self, key: tuple, call: AttentionCall) -> Provider | None:
        """Time the candidates in order, then in reverse order (a provider's time is its faster round: a clock
        ramp or a host hiccup then hurts no one position), and keep the fixed order's first choice unless
        another candidate beats it by more than SWITCH_MARGIN."""
        takers = list(itertools.islice(self._takers(call, {}), MAX_TIMED))
        if len(takers) < 2:
            return takers[0] if takers else None
        timings: dict[str, float | str] = {}
        for provider in takers + takers[::-1]:
            if isinstance(timings.get(provider.name), str):
                continue  # failed once: not timed again
            try:
                ms = float(self._measure(provider, call))
            except Exception as exc:  # a kernel that fails here is not chosen; explain() says why
                timings[provider.name] = f"failed when timed: {type(exc).__name__}: {str(exc)[:200]}"
                continue
            timings[provider.name] = min(ms, timings.get(provider.name, math.inf))
        self._timings[key] = timings
        timed = [p for p in takers if isinstance(timings[p.name], float) and math.isfinite(timings[p.name])]
        if not timed:
            return takers[0]
        fastest, first = min(timed, key=lambda p: timings[p.name]), timed[0]  # min: ties go to the fixed order
        if timings[fastest.name] < timings[first.name] * (1 - SWITCH_MARGIN):
            return fastest
        return first

    def timings(self, call: AttentionCall) -> dict[str, float | str] | None:
        """The times (ms) measured when autotuning chose for this call's signature; None if it was not timed."""
        return self._timings.get(self._key(call, {}))

    def explain(self, call: AttentionCall) -> str:
        lines = []
        timings = self.timings(call) if self.autotune else None
        order = self.order(call)
        if order != ORDER.get(call.device.type, ()):
            lines.append(f"flash would zero-pad head dim {call.head_dim} and the call has at most "
                         f"{PADDED_FLASH_CUDNN_FIRST_UP_TO} keys: _native_cudnn is tried first")
        for name in order:
            reasons = self._registry[name].reasons(call)
            if reasons:
                lines.append(f"{name}: " + "; ".join(reasons))
            elif timings is None:
                lines.append(f"{name}: takes it")
                break
            else:
                t = timings.get(name)
                lines.append(f"{name}: takes it, " + (f"{t:.3f} ms" if isinstance(t, float) else str(t)))
        if timings is not None:
            lines.append(f"autotuned: chose {self.choose(call).name} (another provider replaces the first in the "
                         f"order only if measured more than {SWITCH_MARGIN:.0%} faster)")
        elif self.autotune:
            lines.append("autotune: not timed yet (or not timeable: dropout, graph capture, compile), fixed order")
        return "\n".join(lines)

    def reasons(self, call, *, need_lse: bool = False, need_backward: bool = False) -> list[str]:
        if self.choose(call, need_lse=need_lse, need_backward=need_backward) is None:
            return [f"no provider in {', '.join(self.order(call))} takes these inputs"]
        return []

    def attention(self, call):
        return scoremods.attention(self.choose(call), call)

    def verdict_depends_on_values(self, call):
        chosen = self.choose(call)
        return chosen is not None and chosen.verdict_depends_on_values(call)

    def runner(self, call):
        # The choice depends only on what dispatch's cache key holds: a cached call runs the chosen provider's
        # runner directly, without choosing again.
        return self.choose(call).runner(call)

    # The contract path is what context-parallel schedules use: forward and backward of one block must run
    # on the same kernel, so both choose among providers that have an LSE and an external-LSE backward. The
    # chosen provider gets the call as its kernel takes it (a window as a mask where it has none); sinks it
    # lacks join its (out, lse) here, and its backward runs with the log-sum-exp that holds them.
    def forward(self, call):
        chosen = self.choose(call, need_lse=True, need_backward=True)
        if call.sinks is None or chosen.capabilities(call.device.type).sinks:
            return chosen.forward(scoremods.as_kernel_call(chosen, call))
        out, lse = chosen.forward(scoremods.as_kernel_call(chosen, call.replace(sinks=None)))
        return add_sinks(out, lse, call.sinks)

    def backward(self, call, dout, out, lse):
        chosen = self.choose(call, need_lse=True, need_backward=True)
        if call.sinks is not None and not chosen.capabilities(call.device.type).sinks:
            call = call.replace(sinks=None)
        return chosen.backward(scoremods.as_kernel_call(chosen, call), dout, out, lse)


def make_auto(registry: dict[str, Provider], autotune: bool = False) -> Auto:
    return Auto(registry, autotune=autotune)


def can_time(call: AttentionCall) -> bool:
    """Whether timing candidates now is harmless: no random numbers consumed, no graph being captured or traced."""
    if call.dropout_p > 0 or torch.compiler.is_compiling():
        return False
    if call.device.type == "cuda":
        return not torch.cuda.is_current_stream_capturing()
    return call.device.type == "cpu"


def measure_ms(provider: Provider, call: AttentionCall) -> float:
    """Median ms of `provider` running `call` as dispatch would (its runner): forward when no gradient is needed,
    else forward+backward on detached copies of the inputs, so the caller's tensors and their .grad are untouched.
    CUDA is timed with triton.testing.do_bench (what benchmarks/ uses), CPU with torch.utils.benchmark."""
    run = provider.runner(call) if not _modified(call) else _modified_runner(provider, call)
    mask = call.attn_mask
    if call.needs_grad:
        q, k, v = (t.detach().requires_grad_(t.requires_grad) for t in (call.query, call.key, call.value))
        inputs = [t for t in (q, k, v) if t.requires_grad]
        dout = torch.randn_like(run(q, k, v, mask))

        def step():
            torch.autograd.grad(run(q, k, v, mask), inputs, dout)
    else:
        q, k, v = call.query, call.key, call.value

        def step():
            run(q, k, v, mask)
    with torch.enable_grad() if call.needs_grad else torch.no_grad():
        if call.device.type == "cuda":
            from triton.testing import do_bench

            with torch.cuda.device(call.device):
                return float(do_bench(step, warmup=10, rep=40))
        from torch.utils.benchmark import Timer

        return Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=0.05).median * 1e3


def _modified(call: AttentionCall) -> bool:
    return call.window is not None or call.softcap is not None or call.sinks is not None


def _modified_runner(provider: Provider, call: AttentionCall) -> Callable:
    """A runner for a call with score modifications, which providers' runners do not take (dispatch never caches
    such calls): the single-device path itself, with the exact routes where the provider needs them."""

    def run(query, key, value, attn_mask):
        return scoremods.attention(provider, call.replace(query=query, key=key, value=value, attn_mask=attn_mask))

    return run
