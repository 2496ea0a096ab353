"""FlashAttention-4's sm90 backward kernels, launched one by one: one call's backward, and one float32 dQ
accumulator for all of a ring rank's backward steps.

The three kernels
    flash_attn.cute's `_flash_attn_bwd` runs three kernels per call: a preprocess that computes dO . out per row
    and log2 of the log-sum-exp and clears a float32 dQ accumulator, the main kernel, which writes dK and dV and
    adds into that accumulator, and a postprocess that rounds the accumulator to dQ. `Sm90BackwardKernels`
    launches each of them itself, with the library's tile configuration and argument lists.

One call's backward (`Sm90BackwardKernels.launch_backward`)
    The same three launches for one call (the `flash` provider's backward and its training path). This path
    exists only for host time: the kernels and their arguments are the library's, what is skipped is
    `_flash_attn_bwd`'s per-call Python. dK and dV are the library's bits; dQ, summed by float32 atomic adds in
    both, differs only by the order of those adds (tests/gpu/fa4_direct_check.py checks both on a GPU).

One varlen call's backward (`Sm90BackwardKernels.launch_varlen_backward`)
    The same three launches with the call's cu_seqlens (flash_varlen: packed documents, each chain of a packed
    ring). The accumulators are sized as the library sizes them for varlen: every sequence's rows start on a new
    tile, so one tile of padding per sequence. Above the library's BIN_BATCH_SEARCH_THRESH sequences the library
    adds a tile-count aid for its scheduler, which these launches do not build: such calls run the library's
    function.

One accumulator per ring rank (`SharedAccumulatorBackward`)
    A ring backward calls the kernel once per step, on the rank's query rows (or the later half of them under
    zigzag) against each KV block: through the library, every step pays the preprocess and the postprocess over
    its rows, and the rank then sums the steps' dQ parts. Here the preprocess runs once on the rank's rows, the
    main kernel once per step on views of the accumulator and of the row statistics, and the postprocess once,
    when dQ is asked for: less work per step, no dQ parts to keep and sum, one rounding of dQ. The float32
    accumulator is held across the steps, so with few steps it can take more memory than the per-step parts.

One accumulator per packed ring rank (`SharedVarlenAccumulator`)
    The same for varlen calls: the packed ring's steps each call the kernel on some of a rank's rows (the late
    chunk of a split document, or whole documents) against another rank's keys. The frame is the rank's
    diagonal call, one sequence per document; every other step's call is given the frame's sequence count, its
    sequence i being rows of frame sequence i by a start and a length (the library's seqused), so the kernel
    finds them in the accumulator where the frame's preprocess put their statistics. That holds for rows that
    start a whole number of tiles into their frame sequence and end on a tile boundary of it or at its end; the
    packed layout makes a rank's early chunks whole tiles so that its late chunks start on one
    (cp/packed_layout.CHUNK_TILE). Calls whose rows do not fit run their own backward.

The tile
    The accumulator is stored tile by tile in the order of the kernel's tile, so every block of a rank must use
    the same tile. The library picks one tile for causal blocks and another (with dQ stored swapped) for the
    others. A ring without causality has only non-causal blocks over all of a rank's rows: they keep the
    library's tile. A causal ring has one causal block per rank and non-causal ones, some on the later half of
    the rows, which under zigzag starts on a multiple of the causal tile's rows but not of the other's: all of
    them run on the causal tile, at some cost to the non-causal blocks' main kernel. A kernel is compiled per
    tile configuration: one compiled for another tile would add into the accumulator in another order than the
    rank's postprocess reads.

When
    sm90, a release inside the checked window (fa4_release_window: the kernels and the accumulator's layout are
    private API), Hq == Hkv (with grouped heads the library sums dK/dV in accumulators too), head dims the
    provider does not pad, fp16/bf16, no deterministic algorithms, no window and no softcap (the kernel is
    compiled without them; sinks need nothing: the log-sum-exp it is handed holds them). Otherwise
    `shared_accumulator_backward` returns None and the provider's per-block backward runs. A block whose rows
    start off a tile boundary, or end before the shared rows do off one (the kernel adds whole tiles: rows past a
    block's end would land on other rows), or that has a window or softcap, runs the per-block backward too, and
    its dQ is added at the end.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...contract import (AttentionCall, Provider, SharedRowsBackward, device_capability, lse_for_kernel_backward,
                         on_device, rows_may_be_empty)
from . import fa4_release_window
from .fa4_sm90_forward import varlen_packing_fits

_HALF = (torch.float16, torch.bfloat16)
# What the launches below read from flash_attn.cute.interface: without any of them, the library's backward runs.
INTERFACE_NAMES = ("_tile_size_bwd_sm90", "_bwd_preprocess", "_bwd_postprocess_convert", "_get_device_arch",
                   "FlashAttentionBackwardSm90", "to_cute_tensor", "get_broadcast_dims", "torch2cute_dtype_map",
                   "AuxData", "cute")


def missing_interface_names(api: Any) -> list[str]:
    """The names the launches read that `api` (flash_attn.cute.interface) lacks."""
    return [name for name in INTERFACE_NAMES if not hasattr(api, name)]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _tile_config_key(config) -> tuple:
    """A hashable key of the library's tile configuration (a dataclass of plain values)."""
    return tuple(sorted(vars(config).items()))


def block_rows_fit_tiles(rows: slice, q_len: int, tile_m: int) -> bool:
    """Whether a block on `rows` of `q_len` shared rows can add into the shared accumulator: it starts on a tile
    boundary, and its last tile (the kernel adds whole tiles) ends on one or runs past every shared row."""
    return rows.start % tile_m == 0 and (rows.stop == q_len or rows.stop % tile_m == 0)


class Sm90BackwardKernels:
    """flash_attn.cute's sm90 backward kernels, launched one at a time (see the module docstring)."""

    def __init__(self, api: Any) -> None:
        self._api = api
        self._compiled: dict[tuple, Any] = {}  # main kernels by configuration, compiled on first use
        self._configs: dict[tuple, Any] = {}  # the library's tile configuration by (head dims, causal)
        self._config_keys: dict[int, tuple] = {}  # id(config) -> its hashable key (configs are kept above)

    @classmethod
    def load(cls, api: Any, version: str) -> "Sm90BackwardKernels | None":
        """The launcher for `api` of release `version`, or None outside the release window (see
        fa4_release_window) or where `api` lacks a name the launches read."""
        if not fa4_release_window.allows(version) or missing_interface_names(api):
            return None
        return cls(api)

    def tile_config(self, head_dim: int, head_dim_v: int, causal: bool):
        """The tile configuration every block of a rank uses: the library's for causal blocks in a causal ring
        (some of whose blocks are not causal), else the library's for non-causal blocks."""
        key = (head_dim, head_dim_v, causal)
        config = self._configs.get(key)
        if config is None:
            config = self._configs[key] = self._api._tile_size_bwd_sm90(head_dim, head_dim_v, causal, False)
            self._config_keys[id(config)] = _tile_config_key(config)
        return config

    @staticmethod
    def head_dim_rounded(config, head_dim: int) -> int:
        """The accumulator's columns per row, as the library sizes them."""
        return _round_up(head_dim, Sm90BackwardKernels._head_dim_multiple(config))

    def preprocess(self, config, out, dout, lse, dpsum, lse_log2, accum, cu_seqlens_q=None) -> None:
        """dpsum = rowsum(dout * out), lse_log2 = lse * log2(e), accum = 0; tensors in the library's layout
        (varlen given `cu_seqlens_q`)."""
        api = self._api
        api._bwd_preprocess(out, dout, dpsum, lse, lse_log2, accum, cu_seqlens_q, None, None,
                            api.torch2cute_dtype_map[out.dtype], out.shape[-1], out.shape[-1],
                            config.m_block_size, hdim_multiple_of=self._head_dim_multiple(config), fake_mode=False)

    def main(self, config, q, k, v, dout, lse_log2, dpsum, accum, dk, dv, scale: float, causal: bool,
             packing=None) -> None:
        """The main kernel: dK and dV of one block into `dk`, `dv`; its dQ added into `accum` (a view of the
        shared one). With `packing` (cu_seqlens and longest lengths) a varlen call on (total, H, D) tensors."""
        api = self._api
        if packing is None:
            single_q = accum.shape[-1] // self.head_dim_rounded(config, q.shape[-1]) == config.m_block_size
            single_k = _round_up(k.shape[1], config.n_block_size) == config.n_block_size
            cu_q = cu_k = None
        else:  # the library's one-block flags read the longest sequences of a varlen call
            single_q = _round_up(packing.max_seqlen_q, config.m_block_size) == config.m_block_size
            single_k = _round_up(packing.max_seqlen_k, config.n_block_size) == config.n_block_size
            cu_q, cu_k = packing.cu_seqlens_q, packing.cu_seqlens_k
        used_q, used_k = (None, None) if packing is None else (packing.seqused_q, packing.seqused_k)
        # the tile configuration is part of the key: a kernel compiled for another tile would add into the
        # accumulator in another order than this rank's postprocess reads
        config_key = self._config_keys.get(id(config))
        if config_key is None:  # a configuration `tile_config` did not hand out
            config_key = _tile_config_key(config)
        key = (config_key, q.dtype, q.shape[-1], v.shape[-1], causal, single_q, single_k, packing is None,
               used_q is None, used_k is None, *(tuple(api.get_broadcast_dims(t)) for t in (q, k, v, dout)))
        if key not in self._compiled:
            self._compiled[key] = self._compile(config, causal, q, k, v, dout, lse_log2, dpsum, accum, dk, dv,
                                                scale, cu_q, cu_k, used_q, used_k)
        # after the tensors and the scale: the positional list `_flash_attn_bwd` of the checked releases passes
        # for a call without window, softcap, score/mask mod or block sparsity (each None, aux data empty), the
        # cu_seqlens and the seqused lengths first (None for a dense call)
        self._compiled[key](q, k, v, dout, lse_log2, dpsum, accum, dk, dv, scale, cu_q, cu_k, used_q, used_k, None,
                            None, None, None, None, api.AuxData(None, None), None, None)

    def postprocess(self, config, accum, dq, scale: float, cu_seqlens_q=None) -> None:
        """dq = the accumulator rounded to dq's dtype (the library applies the softmax scale here); varlen given
        `cu_seqlens_q`."""
        api = self._api
        threads = 128 if config.dQ_single_wg else config.num_wg * 128
        api._bwd_postprocess_convert(accum, dq, scale, cu_seqlens_q, None, api._get_device_arch(),
                                     api.torch2cute_dtype_map[dq.dtype], dq.shape[-1], config.m_block_size,
                                     threads, config.AtomLayoutMdQ, config.dQ_swapAB, use_2cta_instrs=False,
                                     cluster_size=1, accum_order=None, cu_total_m_blocks=None, sink_tensors=None,
                                     hdim_multiple_of=self._head_dim_multiple(config), fake_mode=False)

    def can_launch_backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether `launch_backward` runs this (B, S, H, D) call as `_flash_attn_bwd` does: an sm90 GPU,
        fp16/bf16, Hq == Hkv (with grouped heads the library sums dK/dV in accumulators of its own), one head
        dim, and something to compute."""
        return (q.is_cuda and q.dtype in _HALF and q.dim() == 4 and q.shape[2] == k.shape[2]
                and q.shape[-1] == k.shape[-1] == v.shape[-1] and 8 <= q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
                and 0 not in q.shape and 0 not in k.shape and device_capability(q.device)[0] == 9)

    def launch_backward(self, q, k, v, out, dout, lse, scale: float | None, causal: bool):
        """(dq, dk, dv) of one whole call: the library's three launches (preprocess, main, postprocess) with
        the library's tile for `causal`, on (B, S, H, D) tensors and the kernel-form lse (B, H, S) float32, made
        contiguous where the library would (its `maybe_contiguous`), without `_flash_attn_bwd`'s per-call
        Python (see the module docstring)."""
        q, k, v, out, dout, lse = (_aligned_or_copy(t) for t in (q, k, v, out, dout, lse))
        batch, q_len, heads, head_dim = q.shape
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        config = self.tile_config(head_dim, head_dim, causal)
        rows = _round_up(q_len, config.m_block_size)
        opts = {"dtype": torch.float32, "device": q.device}
        accum = torch.empty(batch, heads, rows * self.head_dim_rounded(config, head_dim), **opts)
        dpsum, lse_log2 = torch.empty(batch, heads, rows, **opts), torch.empty(batch, heads, rows, **opts)
        self.preprocess(config, out, dout, lse, dpsum, lse_log2, accum)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        self.main(config, q, k, v, dout, lse_log2, dpsum, accum, dk, dv, scale, causal)
        dq = torch.empty_like(q)
        self.postprocess(config, accum, dq, scale)
        return dq, dk, dv

    def can_launch_varlen_backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing) -> bool:
        """Whether `launch_varlen_backward` runs this varlen call as `_flash_attn_bwd` does: (total, H, D)
        tensors as `can_launch_backward` takes them, and a packing fa4_sm90_forward.varlen_packing_fits."""
        return (varlen_packing_fits(self._api, q, k, v, packing)
                and self.can_launch_backward(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)))

    def launch_varlen_backward(self, q, k, v, out, dout, lse, packing, scale: float | None, causal: bool):
        """(dq, dk, dv) of one varlen call: the library's three launches with the cu_seqlens, on (total, H, D)
        tensors and the varlen lse (H, total_q) float32, its accumulators sized as the library sizes them (each
        sequence's rows start on a tile, so one tile of padding per sequence)."""
        q, k, v, out, dout, lse = (_aligned_or_copy(t) for t in (q, k, v, out, dout, lse))
        cu_q = packing.cu_seqlens_q  # contiguous: varlen_packing_fits
        total_q, heads, head_dim = q.shape
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        config = self.tile_config(head_dim, head_dim, causal)
        tile = config.m_block_size
        rows = (total_q + cu_q.shape[0] * tile - 1) // tile * tile
        opts = {"dtype": torch.float32, "device": q.device}
        accum = torch.empty(heads, rows * self.head_dim_rounded(config, head_dim), **opts)
        dpsum, lse_log2 = torch.empty(heads, rows, **opts), torch.empty(heads, rows, **opts)
        self.preprocess(config, out, dout, lse, dpsum, lse_log2, accum, cu_q)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        self.main(config, q, k, v, dout, lse_log2, dpsum, accum, dk, dv, scale, causal, packing)
        dq = torch.empty_like(q)
        self.postprocess(config, accum, dq, scale, cu_q)
        return dq, dk, dv

    @staticmethod
    def _head_dim_multiple(config) -> int:
        return 64 if config.dKV_swapAB else 32

    def _compile(self, config, causal, q, k, v, dout, lse_log2, dpsum, accum, dk, dv, scale, cu_q=None,
                 cu_k=None, used_q=None, used_k=None):
        api = self._api
        kernel = api.FlashAttentionBackwardSm90(
            api.torch2cute_dtype_map[q.dtype], q.shape[-1], v.shape[-1], 1, causal, is_local=False,
            deterministic=False, tile_m=config.m_block_size, tile_n=config.n_block_size,
            Q_stage=config.num_stages_Q, dO_stage=config.num_stages_dO, PdS_stage=config.num_stages_PdS,
            SdP_swapAB=config.SdP_swapAB, dKV_swapAB=config.dKV_swapAB, dQ_swapAB=config.dQ_swapAB,
            AtomLayoutMSdP=config.AtomLayoutMSdP, AtomLayoutNdKV=config.AtomLayoutNdKV,
            AtomLayoutMdQ=config.AtomLayoutMdQ, num_threads=(config.num_wg + 1) * 128, V_in_regs=False,
            score_mod=None, score_mod_bwd=None, mask_mod=None, has_aux_tensors=False, q_subtile_factor=2,
            dQ_single_wg=config.dQ_single_wg)
        tensors = [api.to_cute_tensor(t) for t in (q, k, v, dout, lse_log2, dpsum, accum, dk, dv)]
        cu = [api.to_cute_tensor(t, assumed_align=4) if t is not None else None
              for t in (cu_q, cu_k, used_q, used_k)]
        stream = api.cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
        return api.cute.compile(kernel, *tensors, scale, *cu, None, None, None, None, None,
                                api.AuxData(None, None), None, None, stream, options="--enable-tvm-ffi")


class SharedAccumulatorBackward(SharedRowsBackward):
    """contract.SharedRowsBackward with one FA4 dQ accumulator for every block whose rows allow it
    (`block_rows_fit_tiles`)."""

    def __init__(self, provider: Provider, call: AttentionCall, dout: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, kernels: Sm90BackwardKernels) -> None:
        super().__init__(provider, call)  # sums the dQ of blocks that cannot share the accumulator
        self._kernels, self._q_len, self._scale = kernels, call.q_len, call.scale
        self._config = kernels.tile_config(call.head_dim, call.value_dim, call.is_causal)
        self._tile = self._config.m_block_size
        self._dim_rounded = kernels.head_dim_rounded(self._config, call.head_dim)
        self._query = _to_kernel_layout(call.query, call.dtype)
        o, do = (_to_kernel_layout(t, call.dtype) for t in (out, dout))
        b, h, rows = call.batch, call.q_heads, _round_up(call.q_len, self._tile)
        opts = {"dtype": torch.float32, "device": call.device}
        self._accum = torch.empty(b, h, rows * self._dim_rounded, **opts)
        self._dpsum, self._lse_log2 = torch.empty(b, h, rows, **opts), torch.empty(b, h, rows, **opts)
        lse_k = lse_for_kernel_backward(lse.detach(), rows_may_be_empty(call)).float().contiguous()
        with on_device(call.device):
            kernels.preprocess(self._config, o, do, lse_k, self._dpsum, self._lse_log2, self._accum)
        self._added = False

    def block(self, call: AttentionCall, rows: slice, dout: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not block_rows_fit_tiles(rows, self._q_len, self._tile) or not _plain_scores(call):
            return super().block(call, rows, dout, out, lse)
        q, k, v, do = (_to_kernel_layout(t, call.dtype) for t in (call.query, call.key, call.value, dout))
        first, count = rows.start, _round_up(rows.stop - rows.start, self._tile)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        with on_device(call.device):
            self._kernels.main(self._config, q, k, v, do, self._lse_log2[:, :, first:first + count],
                               self._dpsum[:, :, first:first + count],
                               self._accum[:, :, first * self._dim_rounded:(first + count) * self._dim_rounded],
                               dk, dv, self._scale, call.is_causal)
        self._added = True
        return dk.transpose(1, 2), dv.transpose(1, 2)

    def dq(self, dtype: torch.dtype) -> torch.Tensor:
        if not self._added:
            return super().dq(dtype)
        dq = torch.empty_like(self._query)  # (B, S, H, D) view of (B, H, S, D) storage, as the query
        with on_device(dq.device):
            self._kernels.postprocess(self._config, self._accum, dq, self._scale)
        dq = dq.transpose(1, 2)
        if self._dq.empty:
            return dq if dq.dtype == dtype else dq.to(dtype)
        self._dq.add(slice(0, self._q_len), dq)
        return super().dq(dtype)


class SharedVarlenAccumulator:
    """One dQ accumulator over a packed ring rank's rows, for every step's varlen call (see the module docstring).

    The frame is the rank's diagonal call: every row, one sequence per document the rank holds (its `Packing`).
    The preprocess runs once over it, the postprocess once, and each step's main kernel adds into the frame's
    accumulator through a packing of its own with the frame's sequence count (`add`): its sequence i is rows of
    the frame's sequence i, named by a start (cu_seqlens) and a length (seqused), and keys of its own. The kernel
    finds sequence i's rows in the accumulator at (cu_seqlens_q[i] + i * tile) // tile * tile, the frame's place
    for them only where the rows start a whole number of tiles into frame sequence i; the kernel adds whole tiles,
    so they must also end on a tile boundary of it or at its end (past its end the frame's rows are padding,
    whose log-sum-exp of +inf makes every probability 0). The caller builds such packings (cpattn/packed_varlen.py);
    every call runs on the frame's tile configuration, `tile` rows."""

    def __init__(self, kernels: Sm90BackwardKernels, q, dout, out, lse, frame, scale: float | None, causal: bool):
        self._kernels, self._frame = kernels, frame
        self._q, self._dout = _aligned_or_copy(q), _aligned_or_copy(dout)
        total_q, heads, head_dim = q.shape
        self._scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self._config = kernels.tile_config(head_dim, head_dim, causal)
        self.tile = self._config.m_block_size
        rows = (total_q + frame.cu_seqlens_q.shape[0] * self.tile - 1) // self.tile * self.tile
        opts = {"dtype": torch.float32, "device": q.device}
        self._accum = torch.empty(heads, rows * kernels.head_dim_rounded(self._config, head_dim), **opts)
        self._dpsum, self._lse_log2 = torch.empty(heads, rows, **opts), torch.empty(heads, rows, **opts)
        kernels.preprocess(self._config, _aligned_or_copy(out), self._dout, _aligned_or_copy(lse), self._dpsum,
                           self._lse_log2, self._accum, frame.cu_seqlens_q)

    def add(self, k, v, packing, causal: bool, keys_in_gaps: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(dk, dv) of one call on the frame's rows (through `packing`, see the class docstring) against `k`, `v`;
        its dQ added into the accumulator. `keys_in_gaps`: keys no sequence reads, whose dK/dV rows the kernel
        never writes (they are zeroed here)."""
        k, v = _aligned_or_copy(k), _aligned_or_copy(v)
        make = torch.zeros_like if keys_in_gaps else torch.empty_like
        dk, dv = make(k), make(v)
        self._kernels.main(self._config, self._q, k, v, self._dout, self._lse_log2, self._dpsum, self._accum, dk,
                           dv, self._scale, causal, packing)
        return dk, dv

    def dq(self) -> torch.Tensor:
        """dQ of every frame row, from what every `add` added, rounded once to the inputs' dtype."""
        dq = torch.empty_like(self._q)
        self._kernels.postprocess(self._config, self._accum, dq, self._scale, self._frame.cu_seqlens_q)
        return dq


def shared_varlen_accumulator(kernels: Sm90BackwardKernels | None, q, dout, out, lse, frame, scale,
                              causal: bool) -> SharedVarlenAccumulator | None:
    """A SharedVarlenAccumulator over `frame` where its launches run as the library's would (an sm90 GPU, the
    checked window's launches: `can_launch_varlen_backward`, no deterministic algorithms), else None."""
    if (kernels is None or torch.are_deterministic_algorithms_enabled()
            or not kernels.can_launch_varlen_backward(q, q, q, frame)):
        return None
    return SharedVarlenAccumulator(kernels, q, dout, out, lse, frame, scale, causal)


def _plain_scores(call: AttentionCall) -> bool:
    """No window and no softcap: the scores the kernels here are compiled for."""
    return call.window is None and call.softcap is None


def _aligned_or_copy(t: torch.Tensor) -> torch.Tensor:
    """As the library's maybe_contiguous: `t` itself if the last dim is contiguous and the address and every
    other stride are 16-byte aligned (stride 0 allowed: it is part of the compile key), else a contiguous copy."""
    stride, multiple = t.stride(), 16 // t.element_size()
    if stride[-1] == 1 and t.data_ptr() % 16 == 0 and all(s % multiple == 0 for s in stride[:-1]):
        return t
    return t.contiguous() if t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


def _to_kernel_layout(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, S, D) -> the (B, S, H, D) view FA4 takes, in `dtype` (a ring may keep the global out in float32)."""
    return x.detach().to(dtype).transpose(1, 2)


def shared_accumulator_backward(provider: Provider, kernels: Sm90BackwardKernels | None, call: AttentionCall,
                                dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                head_dim_multiple: int) -> SharedAccumulatorBackward | None:
    """A SharedAccumulatorBackward for `call`'s rows where it applies (see the module docstring), else None."""
    if kernels is None or call.device.type != "cuda" or device_capability(call.device)[0] != 9:
        return None
    if (call.q_heads != call.kv_heads or call.head_dim != call.value_dim or call.head_dim % head_dim_multiple
            or call.dtype not in _HALF or torch.are_deterministic_algorithms_enabled()
            or call.attn_mask is not None or math.prod(call.query.shape) == 0 or not _plain_scores(call)):
        return None
    return SharedAccumulatorBackward(provider, call, dout, out, lse, kernels)
