"""SageAttention adapters: INT8-quantised QK^T with FP16/FP8 PV, forward only (inference).

Providers and the `sageattention` function each one calls (tensor_layout="HND", which is cpattn's
(B, H, S, D), so no transpose is needed; GQA is native: "num_qo_heads must be divisible by num_kv_heads"):

    sage                            sageattn            2.x picks a kernel by GPU arch; 1.x is Triton only
    sage_varlen                     sageattn_varlen     packed sequences; takes key-padding masks
    _sage_qk_int8_pv_fp8_cuda       sageattn_qk_int8_pv_fp8_cuda       (2.x, CUDA sm89 kernels)
    _sage_qk_int8_pv_fp8_cuda_sm90  sageattn_qk_int8_pv_fp8_cuda_sm90  (2.x, CUDA sm90 kernels)
    _sage_qk_int8_pv_fp16_cuda      sageattn_qk_int8_pv_fp16_cuda      (2.x, CUDA sm80 kernels)
    _sage_qk_int8_pv_fp16_triton    sageattn_qk_int8_pv_fp16_triton    (2.x, Triton)

Signatures read from thu-ml/SageAttention `sageattention/core.py` (2.x main; 1.x `core.py` of the 1.0.x
line, which exports only `sageattn` and `sageattn_varlen`, has no `return_lse`, takes head dims 64/96/128
(varlen 64/128) and smooths K *in place* with `k -= km`). Every keyword passed is checked with `inspect`
first, because the functions take `**kwargs` and would silently swallow a keyword they do not know.

The log-sum-exp. The kernels return it in base 2; the 2.x wrappers divide by 1.44269504 (natural log),
shape (B, Hq, Sq). K smoothing (smooth_k=True, the default) runs the kernel on K - mean_seq(K): the output
is unchanged (a per-row constant leaves softmax alone) but the kernel's LSE is low by
scale * q . mean(K) per row, an offset that differs per KV shard and corrupts ring merges (the Wan2.2
artifacts behind ROCm/aiter #3334, for AMD's port). Current 2.x wrappers add that back, but LSEs that
disagree between 2.x kernels were reported (SageAttention #120, sm90), and the correction `q @ km^T`
raises for GQA with 1 < Hkv < Hq. So
`forward()` does the smoothing itself, identically for every version: it subtracts the per-(batch, KV
head) mean key computed in float32, calls with smooth_k=False where the function takes it (`sageattn`
2.x does not pass smooth_k on: there the library smooths a K whose mean is already ~0, a no-op shift),
and adds scale * q . mean(K) to the LSE it gets back. `attention()` (no LSE) keeps the library's fused
smoothing on 2.x and pre-smooths on 1.x only, so that 1.x never writes into the caller's key tensor.

The 1.0.6 wheel (the only version on PyPI) has a kernel bug found on an H100: without is_causal, padding
keys of the last 64-key block count in the softmax, so key lengths that are not multiples of 64 are refused.

No backward exists: gradients are refused before any kernel runs.

Score modifications: SageAttention has no window, softcap or sink argument and takes no boolean mask, so windows
and softcaps are refused (the refusal names providers that take them); sinks enter through the log-sum-exp where
the function returns one (cpattn/scoremods.py), forward only like everything here.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange

from ..contract import (
    HALF_DTYPES,
    AttentionCall,
    Availability,
    Capabilities,
    Provider,
    device_capability,
    expand_kv,
    normalize_lse,
    on_device,
)
from ..errors import UnsupportedInputError
from ._libs import (
    declared_parameters,
    installed_version,
    is_missing_module,
    missing_parameters,
    parse_version,
    standin_capabilities,
    standin_devices,
)

MODULE = "sageattention"
MIN_V2 = "2.1.1"
SOURCE_URL = "https://github.com/thu-ml/SageAttention"
INSTALL_HINT = (
    f"pip install 'sageattention>={MIN_V2}' (PyPI has only 1.x; build 2.x from {SOURCE_URL}); "
    "sageattention 1.x runs 'sage' and 'sage_varlen' only, without LSE"
)
# sageattention 1.x asserts these head dims; the adapter zero-pads to the next one (2.x pads by itself).
V1_HEAD_DIMS = (64, 96, 128)
# The 1.0.6 wheel's non-causal Triton kernels load the last 64-key block with zeros past the key length and
# never mask them: each padding key scores 0 and joins the softmax denominator, so the output is wrong
# unless every key length is a multiple of 64 (causal kernels mask them). Seen on an H100.
V1_BLOCK_N = 64
# Its causal kernels take queries in blocks of 128 (see v1_causal_padding).
V1_BLOCK_M = 128
LAST_V1_WITH_PADDING_BUG = "1.0.6"
V1_VARLEN_HEAD_DIMS = (64, 128)
DENSE_PARAMS = ("tensor_layout", "is_causal", "sm_scale")
VARLEN_PARAMS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "is_causal", "sm_scale")


def _cuda_caps(min_cc: tuple[int, int], *, key_padding: bool = False, notes: tuple[str, ...] = ()) -> Capabilities:
    return Capabilities(
        dtypes=HALF_DTYPES, max_head_dim=128, min_compute_capability=min_cc, causal=True,
        key_padding_mask=key_padding, dropout=False, gqa=True, returns_lse=not key_padding,
        backward=False, training=False,
        notes=("forward only: SageAttention has no backward",
               "is_causal needs q_len == kv_len (SageAttention defines its causal mask for square calls only)") + notes,
    )


class _SageProvider(Provider):
    """Shared probe and call logic; subclasses name the function and its hardware."""

    family = "sage"
    package = MODULE
    min_version = MIN_V2
    function: ClassVar[str]
    needs_v2: ClassVar[bool] = True
    required_params: ClassVar[tuple[str, ...]] = DENSE_PARAMS + ("return_lse",)
    extension_flag: ClassVar[str | None] = None  # sageattention.core.SMxx_ENABLED: its CUDA kernels were built
    v1_head_dims: ClassVar[tuple[int, ...]] = V1_HEAD_DIMS

    def __init__(self) -> None:
        super().__init__()
        self._fn = None
        self._params: set[str] = set()
        self._is_v2 = False
        self._counts_block_padding = False
        self._devices: tuple[str, ...] = ()

    # -- availability -------------------------------------------------------------------------
    def _probe(self) -> Availability:
        try:
            lib = importlib.import_module(MODULE)
        except ImportError as exc:
            if is_missing_module(exc, MODULE):
                return Availability(False, None, f"sageattention is not installed: {INSTALL_HINT}")
            return Availability(False, None, f"sageattention failed to import ({type(exc).__name__}: {exc})")
        version, is_v2 = _sage_version(lib)
        problem = (
            self._version_problem(version, is_v2)
            or self._function_problem(lib, version)
            or self._extension_problem(lib, version)
        )
        if problem:
            return Availability(False, version, problem)
        self._fn = getattr(lib, self.function)
        self._params = declared_parameters(self._fn)
        self._is_v2 = is_v2
        self._counts_block_padding = not is_v2 and _at_most(version, LAST_V1_WITH_PADDING_BUG)
        self._devices = standin_devices(lib)
        return Availability(True, version)

    def _version_problem(self, version: str, is_v2: bool) -> str | None:
        if self.needs_v2 and not is_v2:
            return f"needs sageattention>={MIN_V2} (found {version}); PyPI ships only 1.x: build 2.x from {SOURCE_URL}"
        return None

    def _function_problem(self, lib, version: str) -> str | None:
        fn = getattr(lib, self.function, None)
        if fn is None:
            return f"sageattention {version} has no function {self.function}()"
        missing = missing_parameters(fn, self.required_params)
        if missing:
            return (
                f"sageattention {version}: {self.function}() has no parameter {', '.join(missing)}, "
                f"which cpattn passes; install sageattention>={MIN_V2}"
            )
        return None

    def _extension_problem(self, lib, version: str) -> str | None:
        if self.extension_flag is None:
            return None
        built = getattr(getattr(lib, "core", None), self.extension_flag, None)
        if built is False:
            return (
                f"sageattention {version} was built without the CUDA kernels {self.function}() needs "
                f"(sageattention.core.{self.extension_flag} is False): rebuild it from {SOURCE_URL} on a "
                "machine with that GPU architecture"
            )
        return None

    @property
    def _returns_lse(self) -> bool:
        return "return_lse" in self._params

    def capabilities(self, device_type: str) -> Capabilities | None:
        caps = self.supports.get(device_type)
        if not self.availability().ok:
            return caps
        if caps is None and device_type in self._devices:
            caps = standin_capabilities(self.supports["cuda"])
        if caps is not None and caps.returns_lse and not self._returns_lse:
            caps = dataclasses.replace(caps, returns_lse=False)
        return caps

    def extra_reasons(self, call: AttentionCall, caps: Capabilities) -> list[str]:
        out = []
        if call.is_causal and call.q_len != call.kv_len:
            out.append(
                f"is_causal=True with q_len {call.q_len} != kv_len {call.kv_len}: SageAttention defines its "
                "causal mask only for q_len == kv_len"
            )
        if self._counts_block_padding and not call.is_causal:
            uneven = sorted({n for n in self.key_lengths(call) if n % V1_BLOCK_N})
            if uneven:
                out.append(
                    f"sageattention {self.availability().version} counts the zero padding of its last "
                    f"{V1_BLOCK_N}-key block as keys when is_causal=False, which gives wrong outputs unless "
                    f"every key length is a multiple of {V1_BLOCK_N} (here {', '.join(map(str, uneven[:4]))}); "
                    f"use sageattention>={MIN_V2} or another provider"
                )
        return out

    def key_lengths(self, call: AttentionCall) -> list[int]:
        """How many keys each sequence hands the kernel."""
        return [call.kv_len]

    # -- kernels ------------------------------------------------------------------------------
    # sageattention calls torch.cuda.set_device(v.device): on_device runs it with the tensors' GPU current and
    # restores the caller's after
    def attention(self, call: AttentionCall) -> torch.Tensor:
        self.require_available()
        with torch.no_grad(), on_device(call.device):
            return self._run(call, want_lse=False)[0]

    def forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        self.require_available()
        if not self._returns_lse:
            raise UnsupportedInputError(
                f"provider '{self.name}'",
                [f"{self.function}() of sageattention {self.availability().version} returns no log-sum-exp"],
            )
        with torch.no_grad(), on_device(call.device):
            return self._run(call, want_lse=True)

    def _run(self, call: AttentionCall, want_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        key, value, key_mean = call.key, call.value, None
        if want_lse or not self._is_v2:
            # Smooth here when the LSE is wanted (a shift we know and undo below), and always on 1.x, which
            # would otherwise subtract the mean from the caller's key tensor in place.
            key, key_mean = smoothed_key(key)
        if want_lse and "smooth_k" not in self._params and call.groups > 1:
            # The library smooths on its own here and its LSE correction q @ km^T cannot broadcast over GQA.
            key, value = expand_kv(key, call.groups), expand_kv(value, call.groups)
        query, key, value = pad_head_dims((call.query, key, value), None if self._is_v2 else self.v1_head_dims)
        query, key, value = pad_sequences((query, key, value), self._causal_padding(call))
        kwargs = {"tensor_layout": "HND", "is_causal": call.is_causal, "sm_scale": call.scale}
        if key_mean is not None and "smooth_k" in self._params:
            kwargs["smooth_k"] = False  # K is already smoothed, with a shift the LSE correction below knows
        if want_lse:
            kwargs["return_lse"] = True
        result = self._fn(query, key, value, **kwargs)
        if not want_lse:
            return result[..., : call.q_len, : call.value_dim], None
        out, lse = result
        lse = normalize_lse(lse, call.q_len) + smoothing_shift(call, key_mean)  # 2.x only: never padded
        return out[..., : call.value_dim], lse

    def _causal_padding(self, call: AttentionCall) -> int:
        """Rows to append to q, k and v for 1.x's causal kernels (v1_causal_padding); 0 otherwise."""
        return v1_causal_padding(call.q_len) if call.is_causal and not self._is_v2 else 0


class Sage(_SageProvider):
    """`sageattn`: the library's own choice of kernel for this GPU (sm80/86/89/90/120 in 2.x)."""

    name = "sage"
    description = "SageAttention sageattn (INT8 QK, kernel chosen by the library per GPU arch)"
    function = "sageattn"
    needs_v2 = False
    required_params = DENSE_PARAMS  # return_lse (2.x) only decides whether it returns an LSE
    supports = {"cuda": _cuda_caps((8, 0), notes=(
        "2.x dispatches on sm80/86/89/90/120 and raises ValueError on other GPUs",
        "with sageattention 1.x (Triton) it returns no LSE, so ring attention cannot use it",
    ))}


class SageVarlen(_SageProvider):
    """`sageattn_varlen` on packed sequences: key-padding masks become cu_seqlens (no LSE in any version)."""

    name = "sage_varlen"
    description = "SageAttention sageattn_varlen (packed sequences; key-padding masks)"
    function = "sageattn_varlen"
    needs_v2 = False
    required_params = VARLEN_PARAMS
    v1_head_dims = V1_VARLEN_HEAD_DIMS
    supports = {"cuda": _cuda_caps((8, 0), key_padding=True, notes=(
        "a key-padding mask (B, 1, 1, Sk) bool is packed into cu_seqlens; no LSE, so no ring attention",
    ))}

    def key_lengths(self, call):
        keep = kept_keys(call)
        return [call.kv_len] if keep is None else keep.sum(dim=1).tolist()

    def verdict_depends_on_values(self, call):
        # 1.x's key-length rule counts the keys a key-padding mask keeps: another mask of the same shape may
        # keep a length it must refuse
        return self._counts_block_padding and not call.is_causal and call.attn_mask is not None

    def extra_reasons(self, call, caps):
        out = super().extra_reasons(call, caps)
        if call.is_causal and call.attn_mask is not None:
            out.append("is_causal=True together with a key-padding mask: packing the kept keys shifts their positions")
        return out

    def _run(self, call, want_lse):
        keep = kept_keys(call)
        # Always smooth here: per sequence (the library can only use one mean over the whole packed batch),
        # and never in place on the caller's tensor (1.x).
        key, _ = smoothed_key(call.key, keep)
        query, key, value = pad_head_dims((call.query, key, call.value), None if self._is_v2 else self.v1_head_dims)
        query, key, value = pad_sequences((query, key, value), self._causal_padding(call))  # no mask when causal
        keys = pack_keys(key, value, keep)
        if keys.max_len == 0:  # no sequence has a key: every output row is empty
            return call.query.new_zeros(*call.query.shape[:3], call.value_dim), None
        kwargs = {"is_causal": call.is_causal, "sm_scale": call.scale}
        if "smooth_k" in self._params:
            kwargs["smooth_k"] = False
        q_len = query.shape[2]
        out = self._fn(
            rearrange(query, "b h s d -> (b s) h d"), keys.key, keys.value,
            cu_seqlens_q=query_offsets(call.batch, q_len, call.device), cu_seqlens_k=keys.offsets,
            max_seqlen_q=q_len, max_seqlen_k=keys.max_len, **kwargs,
        )
        out = rearrange(out, "(b s) h d -> b h s d", b=call.batch)[..., : call.q_len, : call.value_dim]
        # A sequence without keys has no defined output in the kernel; the contract says 0.
        return out.masked_fill((keys.lengths == 0).view(-1, 1, 1, 1), 0.0), None


class SageFp8Cuda(_SageProvider):
    name = "_sage_qk_int8_pv_fp8_cuda"
    description = "SageAttention INT8 QK + FP8 PV, CUDA kernels for sm89 (Ada)"
    function = "sageattn_qk_int8_pv_fp8_cuda"
    extension_flag = "SM89_ENABLED"
    supports = {"cuda": _cuda_caps((8, 9), notes=("built for sm89 (and sm120); the sm90 variant is for Hopper",))}


class SageFp8CudaSm90(_SageProvider):
    name = "_sage_qk_int8_pv_fp8_cuda_sm90"
    description = "SageAttention INT8 QK + FP8 PV, CUDA kernels for sm90 (Hopper)"
    function = "sageattn_qk_int8_pv_fp8_cuda_sm90"
    extension_flag = "SM90_ENABLED"
    supports = {"cuda": _cuda_caps((9, 0), notes=("Hopper (sm90) only",))}

    def extra_reasons(self, call, caps):
        out = super().extra_reasons(call, caps)
        if call.device.type == "cuda":
            have = device_capability(call.device)
            if have != (9, 0):
                out.append(f"its kernels run on compute capability 9.0 (Hopper) only, this GPU is sm{have[0]}{have[1]}")
        return out


class SageFp16Cuda(_SageProvider):
    name = "_sage_qk_int8_pv_fp16_cuda"
    description = "SageAttention INT8 QK + FP16 PV, CUDA kernels for sm80+"
    function = "sageattn_qk_int8_pv_fp16_cuda"
    extension_flag = "SM80_ENABLED"
    supports = {"cuda": _cuda_caps((8, 0))}


class SageFp16Triton(_SageProvider):
    name = "_sage_qk_int8_pv_fp16_triton"
    description = "SageAttention INT8 QK + FP16 PV, Triton kernels"
    function = "sageattn_qk_int8_pv_fp16_triton"
    supports = {"cuda": _cuda_caps((8, 0))}


# -- helpers ---------------------------------------------------------------------------------------


def _sage_version(lib) -> tuple[str, bool]:
    """(version label, whether it is >= 2.1.1). Without metadata, the API tells 2.x (return_lse) from 1.x."""
    version = installed_version(lib, MODULE)
    if version is not None:
        return version, parse_version(version) >= parse_version(MIN_V2)
    fn = getattr(lib, "sageattn", None)
    is_v2 = fn is not None and "return_lse" in declared_parameters(fn)
    return ("2.x, version unknown" if is_v2 else "1.x, version unknown"), is_v2


def _at_most(version: str, limit: str) -> bool:
    """version <= limit; an unknown 1.x version counts as affected."""
    return "unknown" in version or parse_version(version) <= parse_version(limit)




def smoothed_key(key: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(K - mean K, mean K): the mean over the sequence per batch and KV head, in float32; over kept keys only
    when `keep` (B, Sk) is given. Always a fresh tensor, never a view of the caller's key."""
    k = key.float()
    if keep is None:
        mean = k.mean(dim=2, keepdim=True)
    else:
        weight = keep[:, None, :, None].to(k.dtype)
        mean = (k * weight).sum(dim=2, keepdim=True) / weight.sum(dim=2, keepdim=True).clamp_min(1.0)
    return (k - mean).to(key.dtype), mean


def smoothing_shift(call: AttentionCall, key_mean: torch.Tensor) -> torch.Tensor:
    """scale * q . mean(K) per (batch, query head, query): what smoothing K took off each row's LSE."""
    mean = expand_kv(key_mean, call.groups)  # (B, Hq, 1, D)
    return call.scale * (call.query.float() @ mean.transpose(-1, -2)).squeeze(-1)


def pad_head_dims(tensors, sizes: tuple[int, ...] | None):
    """Zero-pad q, k, v to one head dim (the next of `sizes` if given). Zero columns add nothing to q . k and
    give extra zero output columns, which the caller slices off; the last dim must also be contiguous."""
    target = max(t.shape[-1] for t in tensors)
    if sizes:
        target = next(size for size in sizes if size >= target)
    out = []
    for t in tensors:
        if t.shape[-1] != target:
            t = F.pad(t, (0, target - t.shape[-1]))
        out.append(t if t.stride(-1) == 1 else t.contiguous())
    return tuple(out)


def kept_keys(call: AttentionCall) -> torch.Tensor | None:
    """(B, Sk) bool of the keys a key-padding mask keeps; None without a mask. Sk is the mask's own key length:
    under context parallelism a rank's call holds its local keys while the mask covers every key, in global
    order, which is what the kernel sees after Ulysses or all-gather."""
    if call.attn_mask is None:
        return None
    keep = call.attn_mask[:, 0, 0, :]
    return keep.expand(call.batch, call.kv_len if keep.shape[-1] == 1 else keep.shape[-1])


@dataclasses.dataclass
class PackedKeys:
    key: torch.Tensor  # (total_k, Hkv, D)
    value: torch.Tensor
    offsets: torch.Tensor  # cu_seqlens_k, int32 (B + 1)
    lengths: torch.Tensor  # int32 (B,)
    max_len: int


def pack_keys(key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None) -> PackedKeys:
    batch, _, kv_len, _ = key.shape
    k, v = rearrange(key, "b h s d -> b s h d"), rearrange(value, "b h s d -> b s h d")
    if keep is None:
        lengths = torch.full((batch,), kv_len, dtype=torch.int32, device=key.device)
        k, v = k.reshape(batch * kv_len, *k.shape[2:]), v.reshape(batch * kv_len, *v.shape[2:])
    else:
        lengths = keep.sum(dim=1, dtype=torch.int32)
        k, v = k[keep], v[keep]
    offsets = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return PackedKeys(k, v, offsets, lengths, int(lengths.max()) if batch else 0)


def query_offsets(batch: int, q_len: int, device) -> torch.Tensor:
    """cu_seqlens_q: every sequence keeps all its q_len queries."""
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * q_len


def v1_causal_padding(seq_len: int) -> int:
    """Zero rows to append to q, k and v (one length, causal) before sageattention 1.x's causal kernels.

    Their diagonal step walks the 64-key blocks up to the end of its 128-query block and loads each block's K
    scale without a bounds check. When the last query block holds at most 64 rows, that walk loads one scale
    past the end of the K-scale tensor for the last sequence and head; the key loads there are masked to 0,
    but 0 times a NaN or Inf scale is NaN, and that row's softmax is NaN (seen on an H100 at 24 tokens per
    sequence). A whole 128-row block keeps the walk inside. The appended keys come after every real query, so
    the causal mask hides them from real rows; the appended query rows are dropped."""
    tail = seq_len % V1_BLOCK_M
    return V1_BLOCK_M - tail if 0 < tail <= V1_BLOCK_N else 0


def pad_sequences(tensors, rows: int):
    """(B, H, S, D) tensors with `rows` zero rows appended to the sequence; unchanged when rows is 0."""
    return tensors if rows == 0 else tuple(F.pad(t, (0, 0, 0, rows)) for t in tensors)


def make_providers() -> list[Provider]:
    return [Sage(), SageVarlen(), SageFp8Cuda(), SageFp8CudaSm90(), SageFp16Cuda(), SageFp16Triton()]
