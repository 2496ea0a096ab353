"""STAND-IN for FlashAttention, for testing cpattn's adapter glue only. It is NOT FlashAttention.

Everything here is plain PyTorch math in float32 on whatever device the tensors are on (the tests use CPU):
no tiling, no kernels, no performance meaning. A test that passes against it says the adapter calls the
library the way the library's source says it must be called; it says nothing about the real kernels.

What it mimics, as read from the public flash-attention source (flash_attn/flash_attn_interface.py,
hopper/flash_attn_interface.py, flash_attn/cute/interface.py):

* module names: ``flash_attn`` + ``flash_attn.flash_attn_interface`` (FlashAttention-2),
  ``flash_attn_interface`` (FlashAttention-3), ``flash_attn`` + ``flash_attn.cute`` +
  ``flash_attn.cute.interface`` (FlashAttention-4);
* function names, parameter names, order and defaults; for FA2 >= 2.7 the private functions are torch custom
  ops (their Python signature is ``(*args, **kwargs)``, the parameters live in the op schema), for 2.6 they are
  plain functions with ``window_size`` and 8-value returns;
* layouts (B, S, H, D) and packed (total, H, D), KV heads not expanded (GQA), causal masks aligned to the
  bottom-right corner, LSE (B, H, S) and varlen LSE (H, total_q), +inf (FA2/FA3) or -inf (FA4) LSE on rows
  that see no key, FA4 returning lse=None unless asked or grads are needed;
* score modifications with the libraries' conventions: windows bottom-right aligned like causal masks (per
  sequence in varlen calls), window sides -1 = unbounded in FA2/FA3 (``window_size`` pairs in the public functions
  and FA2 2.6's private ones, ``window_size_left``/``_right`` elsewhere) and None = unbounded in FA4, causal
  setting the right side to 0; softcap c * tanh(s / c) of the scaled scores before masking (0.0 off; FA4's
  forward also takes None, its backward only 0.0); FA4's ``learnable_sink`` (one logit per query head in every
  row's denominator, lse = the sink on rows without keys), its private backward returning the sink's gradient as
  a fourth value, its public functions passing that gradient on. A value the libraries would reinterpret (a
  negative side other than FA2/FA3's -1, an FA4 side of -1) raises instead, so a glue bug cannot hide;
* input checks: fp16/bf16 only, head dim a multiple of 8 and <= 256 in the private functions, int32
  cu_seqlens, LSE shapes and dtypes in the backward functions. Features cpattn never uses (ALiBi, paged KV...)
  raise NotImplementedError unless left at their neutral value.

Every module built here sets ``__cpattn_standin_devices__`` (the devices it runs on); cpattn's adapter
accepts CPU tensors only from a module that declares itself a stand-in this way.

Use: ``fa2_modules()``, ``fa3_modules()`` or ``fa4_modules()`` give {module name: module}; put each into
``sys.modules`` (``monkeypatch.setitem``) and map the other names of ``MODULE_NAMES`` to None so that no real
installation is picked up. ``CALLS`` counts calls per function name and ``SEEN`` keeps the shapes each
function last received (both reset by each factory).
"""

import collections
import functools
import inspect
import types
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

STANDIN_DEVICES = ("cpu", "cuda")
MODULE_NAMES = (
    "flash_attn",
    "flash_attn.flash_attn_interface",
    "flash_attn.cute",
    "flash_attn.cute.interface",
    "flash_attn_interface",
)
CALLS: collections.Counter = collections.Counter()
# What each function last received: {name: {"q": shape, "k": shape, "q_contiguous": bool}}, and for the functions
# that take score modifications {"window": (left, right) with None unbounded, "softcap": c or None, "sink": bool}.
SEEN: dict = {}

_HALF = (torch.float16, torch.bfloat16)


# -- math on one sequence: q (Sq, Hq, D), k/v (Sk, Hkv, D) ---------------------------------------------------------


def _expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """KV head j serves query heads j*g .. j*g+g-1, as in flash-attn's GQA."""
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def _reduce_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1] // groups, groups, x.shape[2]).sum(2) if groups > 1 else x


class _Mods(NamedTuple):
    """Score modifications in one form for the math below, whatever a library's convention: the window
    (left, right), bottom-right aligned, None on an unbounded side; the softcap (None: off); the sink logits
    (Hq,) (None: none)."""

    window: Tuple[Optional[int], Optional[int]] = (None, None)
    softcap: Optional[float] = None
    sink: Optional[torch.Tensor] = None


_PLAIN = _Mods()


def _bottom_right_band(sq: int, sk: int, causal: bool, window, device) -> Optional[torch.Tensor]:
    """(Sq, Sk) bool of the keys each query sees, bottom-right aligned as the libraries align causal masks and
    windows: query i sees key j iff i + Sk - Sq - left <= j <= i + Sk - Sq + right; causal sets right to 0."""
    left, right = window
    if causal:
        right = 0
    if left is None and right is None:
        return None
    offset = (torch.arange(sk, device=device)[None, :] - torch.arange(sq, device=device)[:, None]) - (sk - sq)
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left is not None:
        allowed &= offset >= -left
    if right is not None:
        allowed &= offset <= right
    return allowed


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, mods: _Mods = _PLAIN):
    """((Hq, Sq, Sk) float32 scores: scaled, softcapped, masked; tanh of the scaled scores over the softcap,
    None without one)."""
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    tanh = None
    if mods.softcap is not None:
        tanh = torch.tanh(s / mods.softcap)
        s = mods.softcap * tanh
    allowed = _bottom_right_band(q.shape[0], k.shape[0], causal, mods.window, q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s, tanh


def _dropout_keep(shape, dropout_p: float, seed: int, device) -> Optional[torch.Tensor]:
    if dropout_p <= 0.0:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand(shape, generator=gen) >= dropout_p).to(device)


def _sequence_forward(q, k, v, scale, causal, dropout_p, seed, empty_lse, mods=_PLAIN):
    """out (Sq, Hq, Dv) float32 and lse (Hq, Sq) float32 with `empty_lse` on rows that see no key; with sinks
    the lse holds them (the sink's own logit on rows without keys) and no value joins for them."""
    groups = q.shape[1] // k.shape[1]
    qf, kf, vf = q.float(), _expand_heads(k.float(), groups), _expand_heads(v.float(), groups)
    scores, _ = _scores(qf, kf, scale, causal, mods)
    lse = torch.logsumexp(scores, dim=-1)
    if mods.sink is not None:
        lse = torch.logaddexp(lse, mods.sink.float().to(lse.device)[:, None])
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0).unsqueeze(-1))
    keep = _dropout_keep(probs.shape, dropout_p, seed, q.device)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    out = torch.einsum("hqk,khd->qhd", probs, vf)
    return out, lse.masked_fill(empty, empty_lse)


def _sequence_backward(dout, q, k, v, out, lse, scale, causal, dropout_p, seed, mods=_PLAIN):
    """Gradients from the given lse, as the kernels do: P = exp(S - lse). A row whose lse is -inf while it
    has keys gives inf/NaN here, as garbage would come out of a real kernel; +inf gives zero. Under a softcap
    the score gradient is scaled by its derivative, 1 - tanh^2."""
    groups = q.shape[1] // k.shape[1]
    if k.shape[0] == 0:
        return torch.zeros(q.shape, dtype=torch.float32), k.new_zeros(k.shape).float(), v.new_zeros(v.shape).float()
    qf, kf, vf = q.float(), _expand_heads(k.float(), groups), _expand_heads(v.float(), groups)
    do, of = dout.float(), out.float()
    scores, tanh = _scores(qf, kf, scale, causal, mods)
    probs = torch.exp(scores - lse.float().unsqueeze(-1))
    keep = _dropout_keep(probs.shape, dropout_p, seed, q.device)
    dropped = probs if keep is None else probs * keep / (1.0 - dropout_p)
    dv = torch.einsum("hqk,qhd->khd", dropped, do)
    dprobs = torch.einsum("qhd,khd->hqk", do, vf)
    if keep is not None:
        dprobs = dprobs * keep / (1.0 - dropout_p)
    delta = (do * of).sum(-1).transpose(0, 1).unsqueeze(-1)  # (Hq, Sq, 1): rowsum(dO * O)
    dscores = probs * (dprobs - delta)
    if tanh is not None:
        dscores = dscores * (1 - tanh * tanh)
    dq = torch.einsum("hqk,khd->qhd", dscores, kf) * scale
    dk = torch.einsum("hqk,qhd->khd", dscores, qf) * scale
    return dq, _reduce_heads(dk, groups), _reduce_heads(dv, groups)


def _sink_grad(dout, out, lse, sink):
    """-sum over rows of exp(sink - lse) * rowsum(dO * O), per head, in the sink's dtype, as FA4's backward
    postprocess computes it (a row with lse -inf attended nothing: the sink holds all of it). dout and out are
    (B, S, H, D) with lse (B, H, S), or varlen (total, H, D) with lse (H, total)."""
    delta = (dout.float() * out.float()).sum(-1)  # (B, S, H) or (total, H)
    rows_first = lse.float().transpose(-1, -2)  # (B, S, H) or (total, H)
    share = torch.where(torch.isneginf(rows_first), 1.0, torch.exp(sink.float() - rows_first))
    return (-(share * delta).reshape(-1, sink.shape[0]).sum(0)).to(sink.dtype)


# -- batched and varlen drivers (layouts of the library) -----------------------------------------------------------


def _new_seed(dropout_p: float) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,))) if dropout_p > 0 else 0


def _dense_forward(q, k, v, scale, causal, dropout_p, seed, empty_lse, mods=_PLAIN):
    """(B, S, H, D) inputs -> out (B, Sq, Hq, Dv) in q.dtype, lse (B, Hq, Sq) float32."""
    outs, lses = zip(*(
        _sequence_forward(q[b], k[b], v[b], scale, causal, dropout_p, seed + b, empty_lse, mods)
        for b in range(q.shape[0])
    ))
    return torch.stack(outs).to(q.dtype), torch.stack(lses)


def _dense_backward(dout, q, k, v, out, lse, scale, causal, dropout_p, seed, mods=_PLAIN):
    grads = [
        _sequence_backward(dout[b], q[b], k[b], v[b], out[b], lse[b], scale, causal, dropout_p, seed + b, mods)
        for b in range(q.shape[0])
    ]
    return tuple(torch.stack(g).to(q.dtype) for g in zip(*grads))


def _bounds(cu_seqlens: torch.Tensor) -> List[Tuple[int, int]]:
    values = cu_seqlens.tolist()
    return list(zip(values, values[1:]))


def _varlen_forward(q, k, v, cu_q, cu_k, scale, causal, dropout_p, seed, empty_lse, mods=_PLAIN):
    """Packed (total, H, D) inputs -> out (total_q, Hq, Dv) in q.dtype, lse (Hq, total_q) float32; causal masks
    and windows are aligned per sequence, to its own lengths."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), empty_lse, dtype=torch.float32, device=q.device)
    for i, ((q0, q1), (k0, k1)) in enumerate(zip(_bounds(cu_q), _bounds(cu_k))):
        o, l_ = _sequence_forward(q[q0:q1], k[k0:k1], v[k0:k1], scale, causal, dropout_p, seed + i, empty_lse, mods)
        out[q0:q1], lse[:, q0:q1] = o, l_
    return out.to(q.dtype), lse


def _varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal, dropout_p, seed, mods=_PLAIN):
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for i, ((q0, q1), (k0, k1)) in enumerate(zip(_bounds(cu_q), _bounds(cu_k))):
        g = _sequence_backward(dout[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1], lse[:, q0:q1], scale, causal,
                               dropout_p, seed + i, mods)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = g
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


# -- the libraries' conventions for the modifications -----------------------------------------------------------------
# Anything the adapter should never pass raises: a silently reinterpreted value would hide a glue bug.


def _fa23_mods(where: str, window_size_left, window_size_right, softcap) -> _Mods:
    """FA2/FA3: window sides are ints, -1 unbounded; softcap 0.0 is off."""
    sides = []
    for name, side in (("window_size_left", window_size_left), ("window_size_right", window_size_right)):
        if not isinstance(side, int) or isinstance(side, bool) or side < -1:
            raise NotImplementedError(f"{where}: {name}={side!r}: the stand-in models ints >= 0 and -1 (unbounded)")
        sides.append(None if side == -1 else side)
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise NotImplementedError(f"{where}: softcap={softcap!r}: the stand-in models floats >= 0 (0.0 is off)")
    return _seen(where, _Mods(tuple(sides), float(softcap) if softcap > 0 else None))


def _fa4_mods(where: str, window_size_left, window_size_right, softcap, learnable_sink, backward=False) -> _Mods:
    """FA4: window sides are None (unbounded) or ints >= 0; the forward's softcap None or 0.0 is off, the
    backward's only 0.0 (it builds a softcap score_mod for anything else, None included); learnable_sink (Hq,)
    in fp16, bf16 or fp32."""
    for name, side in (("window_size_left", window_size_left), ("window_size_right", window_size_right)):
        if side is not None and (not isinstance(side, int) or isinstance(side, bool) or side < 0):
            raise NotImplementedError(f"{where}: {name}={side!r}: FA4 takes None (unbounded) or ints >= 0")
    if backward and softcap is None:
        raise NotImplementedError(f"{where}: softcap=None: the library's backward would build a softcap of None")
    if softcap is not None and (not isinstance(softcap, (int, float)) or softcap < 0):
        raise NotImplementedError(f"{where}: softcap={softcap!r}: the stand-in models floats >= 0")
    if learnable_sink is not None and (learnable_sink.dim() != 1 or learnable_sink.dtype not in
                                       (torch.float16, torch.bfloat16, torch.float32)):
        raise RuntimeError(f"{where}: learnable_sink must be (num_head,) float16, bfloat16 or float32")
    return _seen(where, _Mods((window_size_left, window_size_right), float(softcap) if softcap else None,
                              learnable_sink))


def _seen(where: str, mods: _Mods) -> _Mods:
    """Keep what `where` received, as the library reads it: SEEN[where]["window"] (left, right) with None
    unbounded, "softcap" (None: off), "sink" (whether one came)."""
    SEEN.setdefault(where, {}).update(window=mods.window, softcap=mods.softcap, sink=mods.sink is not None)
    return mods


# -- input checks the real functions make (the messages are the stand-in's) -----------------------------------------


def _check_qkv(where: str, q, k, v, same_value_dim: bool = True):
    SEEN[where] = {"q": tuple(q.shape), "k": tuple(k.shape), "q_contiguous": q.is_contiguous()}
    if q.dtype not in _HALF:
        raise RuntimeError(f"{where}: FlashAttention only supports fp16 and bf16 data type, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise RuntimeError(f"{where}: query, key and value must have the same dtype")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] % 8:
            raise RuntimeError(f"{where}: {name} head dim {t.shape[-1]} must be a multiple of 8")
        if t.shape[-1] > 256:
            raise RuntimeError(f"{where}: head dim {t.shape[-1]} is above 256")
    if same_value_dim and not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise RuntimeError(f"{where}: q, k and v must have the same head dim")
    if q.shape[-2] % k.shape[-2]:
        raise RuntimeError(f"{where}: number of heads in key/value must divide number of heads in query")


def _check_cu_seqlens(where: str, q, k, cu_q, cu_k, max_q, max_k):
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu is None or cu.dtype != torch.int32 or cu.dim() != 1:
            raise RuntimeError(f"{where}: {name} must be a 1-D int32 tensor")
    if cu_q.numel() != cu_k.numel():
        raise RuntimeError(f"{where}: cu_seqlens_q and cu_seqlens_k must have batch_size + 1 entries each")
    if int(cu_q[-1]) != q.shape[0] or int(cu_k[-1]) != k.shape[0]:
        raise RuntimeError(f"{where}: cu_seqlens do not end at the number of packed tokens")
    # The kernels size their grids by max_seqlen: a value below a real length would skip tokens.
    if max_q is not None and max(b - a for a, b in _bounds(cu_q)) > max_q:
        raise RuntimeError(f"{where}: max_seqlen_q {max_q} is below a sequence length")
    if max_k is not None and max(b - a for a, b in _bounds(cu_k)) > max_k:
        raise RuntimeError(f"{where}: max_seqlen_k {max_k} is below a sequence length")


def _check_backward_dtypes(where: str, q, out, dout):
    if not (q.dtype == out.dtype == dout.dtype):
        raise RuntimeError(f"{where}: out and dout must have the dtype of q ({q.dtype}), got {out.dtype}, {dout.dtype}")


def _check_lse(where: str, lse, shape):
    if lse.dtype != torch.float32 or tuple(lse.shape) != tuple(shape) or not lse.is_contiguous():
        raise RuntimeError(
            f"{where}: softmax_lse must be a contiguous float32 tensor of shape {tuple(shape)}, "
            f"got {lse.dtype} {tuple(lse.shape)}"
        )


def _check_neutral(where: str, **features):
    neutral = {"alibi_slopes": (None,), "return_softmax": (False,), "block_table": (None,), "leftpad_k": (None,),
               "seqused_k": (None,), "seqused_q": (None,)}
    for name, value in features.items():
        if value not in neutral[name] and not (isinstance(value, (tuple, list)) and tuple(value) in neutral[name]):
            raise NotImplementedError(f"{where}: the stand-in does not model {name}={value!r}")


def _pad_head(x: torch.Tensor) -> torch.Tensor:
    pad = (-x.shape[-1]) % 8
    return F.pad(x, (0, pad)) if pad else x


def _round(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# -- FlashAttention-2 ------------------------------------------------------------------------------------------------
# >= 2.7 signatures (these become torch custom ops, as in the library).


def _fa2_forward_27(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float, causal: bool,
    window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
    return_softmax: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    CALLS["_flash_attn_forward"] += 1
    _check_qkv("_flash_attn_forward", q, k, v)
    _check_neutral("_flash_attn_forward", alibi_slopes=alibi_slopes, return_softmax=return_softmax)
    mods = _fa23_mods("_flash_attn_forward", window_size_left, window_size_right, softcap)
    seed = _new_seed(dropout_p)
    out, lse = _dense_forward(q, k, v, softmax_scale, causal, dropout_p, seed, float("inf"), mods)
    return out, lse, q.new_empty(0), torch.tensor([seed, 0], dtype=torch.int64, device=q.device)


def _fa2_varlen_forward_27(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
    window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None, return_softmax: bool = False,
    block_table: Optional[torch.Tensor] = None, leftpad_k: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    CALLS["_flash_attn_varlen_forward"] += 1
    _check_qkv("_flash_attn_varlen_forward", q, k, v)
    _check_cu_seqlens("_flash_attn_varlen_forward", q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_neutral("_flash_attn_varlen_forward", alibi_slopes=alibi_slopes, return_softmax=return_softmax,
                   block_table=block_table, leftpad_k=leftpad_k, seqused_k=seqused_k)
    mods = _fa23_mods("_flash_attn_varlen_forward", window_size_left, window_size_right, softcap)
    seed = _new_seed(dropout_p)
    out, lse = _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, dropout_p, seed,
                               float("inf"), mods)
    return out, lse, q.new_empty(0), torch.tensor([seed, 0], dtype=torch.int64, device=q.device)


def _fa2_backward_27(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor], dv: Optional[torch.Tensor],
    dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
    softcap: float, alibi_slopes: Optional[torch.Tensor], deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    CALLS["_flash_attn_backward"] += 1
    _check_qkv("_flash_attn_backward", q, k, v)
    _check_backward_dtypes("_flash_attn_backward", q, out, dout)
    _check_neutral("_flash_attn_backward", alibi_slopes=alibi_slopes)
    mods = _fa23_mods("_flash_attn_backward", window_size_left, window_size_right, softcap)
    _check_lse("_flash_attn_backward", softmax_lse, (q.shape[0], q.shape[2], q.shape[1]))
    seed = int(rng_state[0]) if rng_state is not None else 0
    grads = _dense_backward(dout, q, k, v, out, softmax_lse, softmax_scale, causal, dropout_p, seed, mods)
    for buffer, grad in zip((dq, dk, dv), grads):
        buffer.copy_(grad)
    return torch.zeros(q.shape[0], q.shape[2], _round(q.shape[1], 128), dtype=torch.float32, device=q.device)


def _fa2_varlen_backward_27(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor], dv: Optional[torch.Tensor],
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
    softcap: float, alibi_slopes: Optional[torch.Tensor], deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    CALLS["_flash_attn_varlen_backward"] += 1
    _check_qkv("_flash_attn_varlen_backward", q, k, v)
    _check_backward_dtypes("_flash_attn_varlen_backward", q, out, dout)
    _check_cu_seqlens("_flash_attn_varlen_backward", q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_neutral("_flash_attn_varlen_backward", alibi_slopes=alibi_slopes)
    mods = _fa23_mods("_flash_attn_varlen_backward", window_size_left, window_size_right, softcap)
    _check_lse("_flash_attn_varlen_backward", softmax_lse, (q.shape[1], q.shape[0]))
    seed = int(rng_state[0]) if rng_state is not None else 0
    grads = _varlen_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                             dropout_p, seed, mods)
    for buffer, grad in zip((dq, dk, dv), grads):
        buffer.copy_(grad)
    batch = cu_seqlens_q.numel() - 1
    return torch.zeros(q.shape[1], q.shape[0] + 128 * batch, dtype=torch.float32, device=q.device)


@functools.lru_cache(maxsize=None)
def _fa2_custom_ops():
    """The 2.7 private functions registered as custom ops once per process (the library registers
    flashattn::...; the stand-in uses its own namespace so it never collides with a real install)."""
    ns = "cpattn_standin_fa2"
    return {
        "_flash_attn_forward": torch.library.custom_op(f"{ns}::_flash_attn_forward", mutates_args=())(
            _fa2_forward_27),
        "_flash_attn_varlen_forward": torch.library.custom_op(f"{ns}::_flash_attn_varlen_forward",
                                                              mutates_args=())(_fa2_varlen_forward_27),
        "_flash_attn_backward": torch.library.custom_op(f"{ns}::_flash_attn_backward",
                                                        mutates_args=("dq", "dk", "dv"))(_fa2_backward_27),
        "_flash_attn_varlen_backward": torch.library.custom_op(f"{ns}::_flash_attn_varlen_backward",
                                                               mutates_args=("dq", "dk", "dv"))(
            _fa2_varlen_backward_27),
    }


# <= 2.6 signatures: plain functions, window_size as a pair, 8-value forward returns.


def _fa2_forward_26(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax):
    out, lse, s_dmask, rng = _fa2_forward_27(q, k, v, dropout_p, softmax_scale, causal, window_size[0],
                                             window_size[1], softcap, alibi_slopes, return_softmax)
    return out, q, k, v, out, lse, s_dmask, rng


def _fa2_varlen_forward_26(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                           softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax, block_table,
                           leftpad_k=None, seqused_k=None):
    out, lse, s_dmask, rng = _fa2_varlen_forward_27(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size[0], window_size[1], softcap, alibi_slopes, return_softmax, block_table, leftpad_k, seqused_k)
    return out, q, k, v, out, lse, s_dmask, rng


def _fa2_backward_26(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size,
                     softcap, alibi_slopes, deterministic, rng_state=None):
    softmax_d = _fa2_backward_27(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size[0], window_size[1], softcap, alibi_slopes, deterministic, rng_state)
    return dq, dk, dv, softmax_d


def _fa2_varlen_backward_26(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                            deterministic, rng_state=None):
    softmax_d = _fa2_varlen_backward_27(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p, softmax_scale, causal, window_size[0], window_size[1], softcap, alibi_slopes, deterministic,
        rng_state)
    return dq, dk, dv, softmax_d


class _KernelFunction(torch.autograd.Function):
    """Autograd around a private forward/backward pair, as the libraries' FlashAttn*Func classes do."""

    @staticmethod
    def forward(ctx, q, k, v, sink, run_forward, run_backward):
        out, lse, state = run_forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.run_backward, ctx.state = run_backward, state
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, *dsink = ctx.run_backward(dout.contiguous(), q, k, v, out, lse, ctx.state)
        return dq, dk, dv, (dsink[0] if dsink else None), None, None


def _fa2_public(api, q, k, v, dropout_p, softmax_scale, causal, deterministic, window_size, softcap, varlen=None):
    """FlashAttnFunc / FlashAttnVarlenFunc: pad head dims to 8, call the private pair, slice back."""
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    qp, kp, vp = _pad_head(q), _pad_head(k), _pad_head(v)
    style_26 = "window_size" in inspect.signature(api._flash_attn_forward).parameters \
        if not hasattr(api._flash_attn_forward, "_opoverload") else False

    def window(kw):
        if style_26:
            kw["window_size"] = tuple(window_size)
        else:
            kw["window_size_left"], kw["window_size_right"] = window_size
        return kw

    def run_forward(q_, k_, v_):
        kw = window(dict(q=q_, k=k_, v=v_, dropout_p=dropout_p, softmax_scale=scale, causal=causal, softcap=softcap,
                         alibi_slopes=None, return_softmax=False))
        if varlen is None:
            result = api._flash_attn_forward(**kw)
        else:
            result = api._flash_attn_varlen_forward(**kw, **varlen, **({"block_table": None} if style_26 else {}))
        out, lse, rng = (result[0], result[5], result[7]) if len(result) == 8 else (result[0], result[1], result[3])
        return out, lse, rng

    def run_backward(dout, q_, k_, v_, out, lse, rng):
        dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
        kw = window(dict(dout=_pad_head(dout), q=q_, k=k_, v=v_, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv,
                         dropout_p=dropout_p, softmax_scale=scale, causal=causal, softcap=softcap, alibi_slopes=None,
                         deterministic=deterministic, rng_state=rng))
        if varlen is None:
            api._flash_attn_backward(**kw)
        else:
            api._flash_attn_varlen_backward(**kw, **varlen)
        return dq, dk, dv

    return _KernelFunction.apply(qp, kp, vp, None, run_forward, run_backward)[..., :head_dim]


def fa2_modules(version: str = "2.7.4.post1", custom_ops: Optional[bool] = None, rename: Optional[dict] = None,
                add_required: Optional[dict] = None, standin_devices=STANDIN_DEVICES) -> dict:
    """Modules of a stand-in flash-attn `version`: >= 2.7 API (custom ops unless custom_ops=False) or 2.6 API.

    rename={"fn": {"old": "new"}} and add_required={"fn": ["param"]} change the signatures the adapter reads
    (plain functions only), to test the probe's reaction to private-API changes.
    """
    CALLS.clear()
    SEEN.clear()
    style_27 = tuple(int(p) for p in version.split(".")[:2]) >= (2, 7)
    if style_27 and (custom_ops is None or custom_ops) and not (rename or add_required):
        private = dict(_fa2_custom_ops())
    elif style_27:
        private = {"_flash_attn_forward": _fa2_forward_27, "_flash_attn_varlen_forward": _fa2_varlen_forward_27,
                   "_flash_attn_backward": _fa2_backward_27, "_flash_attn_varlen_backward": _fa2_varlen_backward_27}
    else:
        private = {"_flash_attn_forward": _fa2_forward_26, "_flash_attn_varlen_forward": _fa2_varlen_forward_26,
                   "_flash_attn_backward": _fa2_backward_26, "_flash_attn_varlen_backward": _fa2_varlen_backward_26}
    private = _changed(private, rename, add_required)
    api = _module("flash_attn.flash_attn_interface", standin_devices, **private)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        CALLS["flash_attn_func"] += 1
        _check_neutral("flash_attn_func", alibi_slopes=alibi_slopes)
        return _fa2_public(api, q, k, v, dropout_p, softmax_scale, causal, deterministic, window_size, softcap)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        CALLS["flash_attn_varlen_func"] += 1
        _check_neutral("flash_attn_varlen_func", alibi_slopes=alibi_slopes, block_table=block_table)
        varlen = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k)
        return _fa2_public(api, q, k, v, dropout_p, softmax_scale, causal, deterministic, window_size, softcap,
                           varlen)

    public = _changed({"flash_attn_func": flash_attn_func, "flash_attn_varlen_func": flash_attn_varlen_func},
                      rename, add_required)
    for name, fn in public.items():
        setattr(api, name, fn)
    package = _module("flash_attn", standin_devices, __version__=version, flash_attn_interface=api, **public)
    package.__path__ = []
    return {"flash_attn": package, "flash_attn.flash_attn_interface": api}


# -- FlashAttention-3 (hopper/flash_attn_interface.py) ----------------------------------------------------------------


def _fa3_forward(q, k, v, k_new=None, v_new=None, qv=None, out_=None, cu_seqlens_q=None, cu_seqlens_k=None,
                 cu_seqlens_k_new=None, seqused_q=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
                 page_table=None, kv_batch_idx=None, leftpad_k=None, rotary_cos=None, rotary_sin=None,
                 seqlens_rotary=None, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None,
                 causal=False, window_size_left=-1, window_size_right=-1, attention_chunk=0, softcap=0.0,
                 rotary_interleaved=True, scheduler_metadata=None, num_splits=1, pack_gqa=None, sm_margin=0):
    CALLS["_flash_attn_forward"] += 1
    _check_qkv("_flash_attn_forward", q, k, v)
    _check_neutral("_flash_attn_forward", seqused_q=seqused_q, seqused_k=seqused_k)
    mods = _fa23_mods("_flash_attn_forward", window_size_left, window_size_right, softcap)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if cu_seqlens_q is not None:
        _check_cu_seqlens("_flash_attn_forward", q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        out, lse = _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, 0.0, 0, float("inf"), mods)
    else:
        out, lse = _dense_forward(q, k, v, scale, causal, 0.0, 0, float("inf"), mods)
    empty = torch.tensor([], device=q.device)
    return out, lse, empty, empty


def _fa3_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None, sequed_q=None,
                  sequed_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None,
                  softmax_scale=None, is_causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0,
                  deterministic=False, sm_margin=0):
    CALLS["_flash_attn_backward"] += 1
    _check_qkv("_flash_attn_backward", q, k, v)
    _check_backward_dtypes("_flash_attn_backward", q, out, dout)
    mods = _fa23_mods("_flash_attn_backward", window_size_left, window_size_right, softcap)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if cu_seqlens_q is not None:
        _check_cu_seqlens("_flash_attn_backward", q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        _check_lse("_flash_attn_backward", softmax_lse, (q.shape[1], q.shape[0]))
        grads = _varlen_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, scale, is_causal,
                                 0.0, 0, mods)
    else:
        _check_lse("_flash_attn_backward", softmax_lse, (q.shape[0], q.shape[2], q.shape[1]))
        grads = _dense_backward(dout, q, k, v, out, softmax_lse, scale, is_causal, 0.0, 0, mods)
    for buffer, grad in zip((dq, dk, dv), grads):
        buffer.copy_(grad)
    return torch.zeros(1, dtype=torch.float32, device=q.device)


def _fa3_public(api, q, k, v, softmax_scale, causal, deterministic, window_size, softcap, varlen=None):
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    varlen = varlen or {}
    mods = dict(window_size_left=window_size[0], window_size_right=window_size[1], softcap=softcap)

    def run_forward(q_, k_, v_):
        out, lse, *_ = api._flash_attn_forward(q_, k_, v_, softmax_scale=scale, causal=causal, **mods, **varlen)
        return out, lse, None

    def run_backward(dout, q_, k_, v_, out, lse, state):
        dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
        api._flash_attn_backward(dout, q_, k_, v_, out, lse, dq=dq, dk=dk, dv=dv, softmax_scale=scale,
                                 is_causal=causal, deterministic=deterministic, **mods, **varlen)
        return dq, dk, dv

    return _KernelFunction.apply(q, k, v, None, run_forward, run_backward)


def fa3_modules(rename: Optional[dict] = None, add_required: Optional[dict] = None,
                standin_devices=STANDIN_DEVICES) -> dict:
    """The stand-in `flash_attn_interface` module of FlashAttention-3 (current hopper/ API)."""
    CALLS.clear()
    SEEN.clear()
    private = _changed({"_flash_attn_forward": _fa3_forward, "_flash_attn_backward": _fa3_backward},
                       rename, add_required)
    api = _module("flash_attn_interface", standin_devices, **private)

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
        CALLS["flash_attn_func"] += 1
        return _fa3_public(api, q, k, v, softmax_scale, causal, deterministic, window_size, softcap)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                               seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                               k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                               num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                               return_attn_probs=False):
        CALLS["flash_attn_varlen_func"] += 1
        _check_neutral("flash_attn_varlen_func", seqused_q=seqused_q, seqused_k=seqused_k)
        varlen = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k)
        return _fa3_public(api, q, k, v, softmax_scale, causal, deterministic, window_size, softcap, varlen)

    for name, fn in _changed({"flash_attn_func": flash_attn_func, "flash_attn_varlen_func": flash_attn_varlen_func},
                             rename, add_required).items():
        setattr(api, name, fn)
    return {"flash_attn_interface": api}


# -- FlashAttention-4 (flash_attn/cute/interface.py) ---------------------------------------------------------------


def _fa4_forward(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=None,
                 max_seqlen_k=None, page_table=None, softmax_scale=None, causal=False, softcap=None,
                 window_size_left=None, window_size_right=None, learnable_sink=None, m_block_size=128,
                 n_block_size=128, num_threads=384, num_splits=1, pack_gqa=None, _arch=None, score_mod=None,
                 mask_mod=None, block_sparse_tensors=None, cu_total_m_blocks=None, cu_total_n_blocks=None,
                 return_lse=False, out=None, lse=None, aux_tensors=None):
    CALLS["_flash_attn_fwd"] += 1
    _check_qkv("_flash_attn_fwd", q, k, v, same_value_dim=False)
    _check_neutral("_flash_attn_fwd", seqused_q=seqused_q, seqused_k=seqused_k)
    mods = _fa4_mods("_flash_attn_fwd", window_size_left, window_size_right, softcap, learnable_sink)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if cu_seqlens_q is not None:
        _check_cu_seqlens("_flash_attn_fwd", q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        o, l_ = _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, 0.0, 0, float("-inf"), mods)
    else:
        o, l_ = _dense_forward(q, k, v, scale, causal, 0.0, 0, float("-inf"), mods)
    # The library allocates the LSE only when it is asked for or a backward will need it.
    wants_lse = return_lse or any(t is not None and t.requires_grad for t in (q, k, v, learnable_sink))
    return o, (l_ if wants_lse else None)


def _fa4_backward(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, window_size_left=None,
                  window_size_right=None, m_block_size=64, n_block_size=128, num_threads=256, pack_gqa=False,
                  num_stages_Q=2, num_stages_dO=2, SdP_swapAB=False, dKV_swapAB=False, dQ_swapAB=False,
                  AtomLayoutMSdP=2, AtomLayoutNdKV=2, AtomLayoutMdQ=2, V_in_regs=False, cu_seqlens_q=None,
                  cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
                  deterministic=False, dq=None, dk=None, dv=None, score_mod=None, score_mod_bwd=None, mask_mod=None,
                  aux_tensors=None, aux_scalars=None, block_sparse_tensors=None, dlse=None, learnable_sink=None):
    """(dq, dk, dv), and dsink as a fourth value when learnable_sink is given (as 4.0.0b36)."""
    CALLS["_flash_attn_bwd"] += 1
    _check_qkv("_flash_attn_bwd", q, k, v, same_value_dim=False)
    _check_neutral("_flash_attn_bwd", seqused_q=seqused_q, seqused_k=seqused_k)
    mods = _fa4_mods("_flash_attn_bwd", window_size_left, window_size_right, softcap, learnable_sink, backward=True)
    _check_backward_dtypes("_flash_attn_bwd", q, out, dout)
    if dlse is not None:
        raise NotImplementedError("_flash_attn_bwd: the stand-in does not model dlse")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if cu_seqlens_q is not None:
        _check_cu_seqlens("_flash_attn_bwd", q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        _check_lse("_flash_attn_bwd", lse.contiguous(), (q.shape[1], q.shape[0]))
        grads = _varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, causal, 0.0, 0, mods)
    else:
        _check_lse("_flash_attn_bwd", lse.contiguous(), (q.shape[0], q.shape[2], q.shape[1]))
        grads = _dense_backward(dout, q, k, v, out, lse, scale, causal, 0.0, 0, mods)
    if learnable_sink is None:
        return grads
    return (*grads, _sink_grad(dout, out, lse, learnable_sink))


def _fa4_public(api, q, k, v, softmax_scale, causal, deterministic, return_lse, window_size, softcap, learnable_sink,
                varlen=None):
    """FlashAttnFunc / FlashAttnVarlenFunc: the private pair with the library's autograd, the sink's gradient
    included (the backward's fourth value)."""
    varlen = varlen or {}
    lse_box = []
    sides = dict(window_size_left=window_size[0], window_size_right=window_size[1])

    def run_forward(q_, k_, v_):
        out, lse = api._flash_attn_fwd(q_, k_, v_, softmax_scale=softmax_scale, causal=causal, return_lse=True,
                                       softcap=softcap, learnable_sink=learnable_sink, **sides, **varlen)
        lse_box.append(lse)
        return out, lse, None

    def run_backward(dout, q_, k_, v_, out, lse, state):
        sink = None if learnable_sink is None else learnable_sink.detach()
        return api._flash_attn_bwd(q_, k_, v_, out, dout, lse, softmax_scale, causal, softcap, **sides,
                                   deterministic=deterministic, learnable_sink=sink, **varlen)

    out = _KernelFunction.apply(q, k, v, learnable_sink, run_forward, run_backward)
    return out, (lse_box[0] if return_lse else None)


def fa4_modules(version: str = "4.0.0b36", rename: Optional[dict] = None, add_required: Optional[dict] = None,
                standin_devices=STANDIN_DEVICES) -> dict:
    """The stand-in `flash_attn.cute` package of FlashAttention-4 (pip flash-attn-4)."""
    CALLS.clear()
    SEEN.clear()
    private = _changed({"_flash_attn_fwd": _fa4_forward, "_flash_attn_bwd": _fa4_backward}, rename, add_required)
    interface = _module("flash_attn.cute.interface", standin_devices, **private)

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
                        softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, mask_mod=None,
                        full_block_cnt=None, full_block_idx=None, mask_block_cnt=None, mask_block_idx=None,
                        block_size=None, return_lse=False):
        CALLS["flash_attn_func"] += 1
        return _fa4_public(interface, q, k, v, softmax_scale, causal, deterministic, return_lse, window_size, softcap,
                           learnable_sink)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                               seqused_q=None, seqused_k=None, page_table=None, softmax_scale=None, causal=False,
                               window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1,
                               pack_gqa=None, deterministic=False, score_mod=None, mask_mod=None,
                               block_sparse_tensors=None, cu_total_m_blocks=None, cu_total_n_blocks=None,
                               aux_tensors=None, return_lse=False):
        CALLS["flash_attn_varlen_func"] += 1
        _check_neutral("flash_attn_varlen_func", seqused_q=seqused_q, seqused_k=seqused_k)
        varlen = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k)
        return _fa4_public(interface, q, k, v, softmax_scale, causal, deterministic, return_lse, window_size, softcap,
                           learnable_sink, varlen)

    public = _changed({"flash_attn_func": flash_attn_func, "flash_attn_varlen_func": flash_attn_varlen_func},
                      rename, add_required)
    for name, fn in public.items():
        setattr(interface, name, fn)
    cute = _module("flash_attn.cute", standin_devices, __version__=version, interface=interface, **public)
    cute.__path__ = []
    package = _module("flash_attn", standin_devices, cute=cute)
    package.__path__ = []
    return {"flash_attn": package, "flash_attn.cute": cute, "flash_attn.cute.interface": interface}


# -- module plumbing -------------------------------------------------------------------------------------------------


def _module(name: str, standin_devices, **attributes) -> types.ModuleType:
    module = types.ModuleType(name, "cpattn test stand-in for FlashAttention (not the real library)")
    if standin_devices:
        module.__cpattn_standin_devices__ = tuple(standin_devices)
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def _changed(functions: dict, rename: Optional[dict], add_required: Optional[dict]) -> dict:
    """Copies of `functions` whose visible signature renames or adds parameters (what a private-API change
    looks like to the adapter's probe); the bodies still take the old names."""
    out = dict(functions)
    for fn_name in set(rename or {}) | set(add_required or {}):
        if fn_name not in out:
            continue
        out[fn_name] = _with_signature_changes(out[fn_name], (rename or {}).get(fn_name, {}),
                                               (add_required or {}).get(fn_name, ()))
    return out


def _with_signature_changes(fn, renames: dict, required: tuple):
    if hasattr(fn, "_opoverload"):
        raise ValueError("signature changes apply to plain functions; build with custom_ops=False")
    signature = inspect.signature(fn)
    params = [p.replace(name=renames.get(p.name, p.name)) for p in signature.parameters.values()]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in required]
    back = {new: old for old, new in renames.items()}

    @functools.wraps(fn)
    def changed(*args, **kwargs):
        return fn(*args, **{back.get(key, key): value for key, value in kwargs.items() if key not in required})

    changed.__signature__ = signature.replace(parameters=params)
    return changed
