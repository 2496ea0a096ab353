"""`auto`: the fastest provider that can take the call on this device, chosen per input signature.

The order comes from measured kernel throughput (benchmarks/results/, H100, bf16): FlashAttention (FA4/FA3)
ahead of cuDNN, cuDNN ahead of PyTorch's own flash kernel, then the memory-efficient kernel and flex, math
last. Quantised kernels (SageAttention) are never picked: they change numerics, so they are opt-in only.
A provider is skipped when it cannot take the inputs (mask, dtype, head dim, gradients, architecture), so
`auto` never fails where some provider works, and never silently picks a lossy one. The choice is cached by
input signature and explained by `explain()` (shown by `python -m cpattn info`).

Not modelled: FlashAttention-4's interface is Python, so on small problems (well under a millisecond of GPU
work) its host time per call can set the pace. On one H100 host cuDNN was then faster by up to 1.75x; on
another, with the same code, FA4 stayed ahead in those shapes (benchmarks/results/h100/bench_auto_*.md). A fixed
size threshold was right on one host and wrong on the other, so the order stays fixed.
"""

from __future__ import annotations

from ..contract import FLOAT_DTYPES, AttentionCall, Capabilities, Provider

ORDER = {
    "cuda": ("flash", "_native_cudnn", "flash_varlen", "_native_flash", "_native_efficient", "flex", "_native_math"),
    "cpu": ("_native_flash", "_native_math"),
}


class Auto(Provider):
    name = "auto"
    family = "auto"
    description = "the fastest provider that takes the inputs here (never a quantised one)"
    _caps = Capabilities(
        dtypes=FLOAT_DTYPES, bool_mask=True, additive_mask=True, key_padding_mask=True, dropout=True,
        backward=True, training=True, mask_grad=False,
        notes=("picks per call: " + " > ".join(ORDER["cuda"]) + " on CUDA; " + " > ".join(ORDER["cpu"]) + " on CPU",),
    )
    supports = {"cpu": _caps, "cuda": _caps}

    def __init__(self, registry: dict[str, Provider]):
        super().__init__()
        self._registry = registry
        self._choices: dict[tuple, Provider | None] = {}

    def choose(self, call: AttentionCall, **need) -> Provider | None:
        """The first provider in this device's order with no reason to refuse `call` (None if none takes it)."""
        key = (call.device, call.dtype, call.query.shape, call.key.shape, call.value.shape, call.mask_kind,
               None if call.attn_mask is None else tuple(call.attn_mask.shape), call.is_causal,
               call.dropout_p > 0, call.needs_grad, tuple(sorted(need.items())))
        if key not in self._choices:
            if len(self._choices) > 4096:
                self._choices.clear()
            self._choices[key] = next(
                (self._registry[n] for n in ORDER.get(call.device.type, ()) if n in self._registry
                 and not self._registry[n].reasons(call, **need)), None)
        return self._choices[key]

    def explain(self, call: AttentionCall) -> str:
        lines = []
        for name in ORDER.get(call.device.type, ()):
            reasons = self._registry[name].reasons(call)
            lines.append(f"{name}: " + ("takes it" if not reasons else "; ".join(reasons)))
            if not reasons:
                break
        return "\n".join(lines)

    def reasons(self, call, *, need_lse: bool = False, need_backward: bool = False) -> list[str]:
        if self.choose(call, need_lse=need_lse, need_backward=need_backward) is None:
            return [f"no provider in {', '.join(ORDER.get(call.device.type, ()))} takes these inputs"]
        return []

    def attention(self, call):
        return self.choose(call).attention(call)

    def runner(self, call):
        # The choice depends only on what dispatch's cache key holds: a cached call runs the chosen provider's
        # runner directly, without choosing again.
        return self.choose(call).runner(call)

    # The contract path is what context-parallel schedules use: forward and backward of one block must run
    # on the same kernel, so both choose among providers that have an LSE and an external-LSE backward.
    def forward(self, call):
        return self.choose(call, need_lse=True, need_backward=True).forward(call)

    def backward(self, call, dout, out, lse):
        return self.choose(call, need_lse=True, need_backward=True).backward(call, dout, out, lse)


def make_auto(registry: dict[str, Provider]) -> Auto:
    return Auto(registry)
