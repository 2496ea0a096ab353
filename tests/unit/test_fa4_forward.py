"""FA4's directly launched sm90 forward (cpattn/providers/flash/fa4_sm90_forward.py), on CPU.

The kernel needs a Hopper GPU, so `StandInApi` (a stand-in, named as such) is the part of flash_attn.cute.interface
the launch reads: its "compiled kernel" writes float64 attention into the output and log-sum-exp it is handed.
What is tested is cpattn's side: which tensors the launch accepts, one compile per shape class, the arguments it
compiles and calls with (varlen calls: the cu_seqlens in their slots), and that the provider never takes the direct
way for a stand-in library.
tests/gpu/fa4_direct_check.py compares the real kernel with the library's forward bit for bit on a GPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
from dataclasses import dataclass

import pytest
import torch

from cpattn.providers.flash import fa4_sm90_forward
from cpattn.providers.flash.fa4_sm90_forward import Sm90Forward


@dataclass(frozen=True)
class FwdConfig:
    m_block_size: int
    n_block_size: int
    mma_pv_is_rs: bool
    intra_wg_overlap: bool


class StandInApi:
    """STAND-IN for flash_attn.cute.interface: records compiles and launches; kernels compute in float64."""

    def __init__(self):
        self.compiles, self.launches, self.kernels = [], [], []
        self.torch2cute_dtype_map = {torch.float16: "f16", torch.bfloat16: "bf16"}
        self.cute = types.SimpleNamespace(compile=self._compile, runtime=types.SimpleNamespace(
            make_fake_stream=lambda use_tvm_ffi_env_stream: "env-stream"))

    @staticmethod
    def _tile_size_fwd_sm90(head_dim, head_dim_v, causal, local):
        return FwdConfig(128, 176 if head_dim > 128 else 128, head_dim <= 128, True)

    @staticmethod
    def get_broadcast_dims(t):
        return tuple(s == 0 for s in t.stride())

    @staticmethod
    def to_cute_tensor(t, assumed_align=16):
        return ("cute", assumed_align, tuple(t.shape))

    @staticmethod
    def AuxData(tensors, scalars):  # noqa: N802 - the library's name
        return ("aux", tensors, scalars)

    class FlashAttentionForwardSm90:
        def __init__(self, dtype, head_dim, head_dim_v, per_kv_head, **options):
            self.args = (dtype, head_dim, head_dim_v, per_kv_head)
            self.options = options

    def _compile(self, kernel, *args, options):
        self.compiles.append((kernel, args, options))
        causal = kernel.options["is_causal"]

        def launch(q, k, v, out, lse, scale, *rest):
            self.launches.append(rest)
            rep = q.shape[2] // k.shape[2]
            qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))
            kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
            scores = qh @ kh.transpose(-1, -2) * scale
            if causal:
                scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
            out.copy_((scores.softmax(-1) @ vh).transpose(1, 2))
            if lse is not None:
                lse.copy_(scores.logsumexp(-1))
        self.kernels.append(launch)
        return launch


def _qkv(b=2, sq=12, sk=12, hq=4, hk=4, d=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(dtype) for s, h in ((sq, hq), (sk, hk), (sk, hk))]


def test_load_needs_the_checked_version_and_every_name():
    api = StandInApi()
    assert isinstance(Sm90Forward.load(api, "4.0.0b36"), Sm90Forward)
    assert Sm90Forward.load(api, "4.0.0b37") is None
    for missing in fa4_sm90_forward.INTERFACE_NAMES:  # a release that renamed or dropped what the launch reads
        names = [n for n in fa4_sm90_forward.INTERFACE_NAMES if n != missing]
        partial = types.SimpleNamespace(**{n: getattr(api, n) for n in names})
        assert Sm90Forward.load(partial, "4.0.0b36") is None


@pytest.mark.parametrize("make, aligned", [
    (lambda: torch.randn(2, 8, 4, 64, dtype=torch.bfloat16), True),
    (lambda: torch.randn(2, 4, 8, 64, dtype=torch.bfloat16).transpose(1, 2), True),  # dispatch's views
    (lambda: torch.randn(2, 8, 4, 64, dtype=torch.bfloat16).expand(2, 8, 4, 64), True),
    (lambda: torch.randn(1, 8, 4, 1, dtype=torch.bfloat16).expand(1, 8, 4, 64), False),  # last dim broadcast
    (lambda: torch.randn(2, 8, 4, 68, dtype=torch.bfloat16)[..., :64], False),  # strides of 68 bf16 = 136 B
    (lambda: torch.randn(2 * 8 * 4 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 8, 4, 64), False),  # address
    (lambda: torch.randn(2, 8, 4, 128, dtype=torch.bfloat16)[..., ::2], False),  # last dim strided
])
def test_has_kernel_layout_is_the_layout_the_kernel_assumes(make, aligned):
    assert fa4_sm90_forward._has_kernel_layout(make()) is aligned


def test_can_launch_refuses_cpu_tensors():
    # the provider asks before every launch; on anything but an sm90 GPU the library's forward runs
    assert not Sm90Forward(StandInApi()).can_launch(*_qkv())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hk", [4, 2, 1])
def test_launch_writes_out_and_lse_and_compiles_once_per_shape_class(causal, hk):
    api = StandInApi()
    direct = Sm90Forward(api)
    q, k, v = _qkv(hk=hk)
    out, lse = direct(q, k, v, None, causal, return_lse=True)
    assert out.shape == q.shape[:3] + v.shape[-1:] and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    reference = torch.nn.functional.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (q, k, v)), is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out.double(), reference.transpose(1, 2), atol=1e-2, rtol=0)
    kernel, args, options = api.compiles[0]
    assert kernel.args == ("bf16", 16, 16, 4 // hk)
    assert kernel.options["pack_gqa"] is (hk < 4) and kernel.options["is_causal"] is causal
    assert kernel.options["tile_m"] == 128 and kernel.options["num_threads"] == 384
    assert args[5] == 1 / math.sqrt(16) and args[-1] == "env-stream" and options == "--enable-tvm-ffi"
    # new tensors of the same class (other lengths, batch, values): the same kernel
    direct(*_qkv(b=1, sq=20, sk=20, hk=hk, seed=1), 0.5, causal, return_lse=True)
    assert len(api.compiles) == 1 and len(api.launches) == 2


def test_each_part_of_the_shape_class_gets_its_own_kernel():
    api = StandInApi()
    direct = Sm90Forward(api)
    q, k, v = _qkv()
    direct(q, k, v, None, False, return_lse=True)
    variants = [
        (_qkv(), True, True),  # causal
        (_qkv(), False, False),  # no log-sum-exp
        (_qkv(dtype=torch.float16), False, True),
        (_qkv(d=32), False, True),
        (_qkv(hk=2), False, True),
        ((q, k.expand(2, 12, 4, 16)[:, :, :1].expand(2, 12, 4, 16), v), False, True),  # a broadcast KV head dim
    ]
    for n, (tensors, causal, lse) in enumerate(variants, start=2):
        out, got_lse = direct(*tensors, None, causal, return_lse=lse)
        assert (got_lse is None) is (not lse)
        assert len(api.compiles) == n
    direct(q, k, v, None, False, return_lse=True)
    assert len(api.compiles) == len(variants) + 1


def test_stand_in_generations_do_not_launch_directly(monkeypatch):
    from standins import flash_attn_standin as standin
    from test_provider_flash import install

    import cpattn

    install(monkeypatch, standin.fa4_modules())
    for name in ("flash", "flash_varlen"):
        gen = cpattn.PROVIDERS[name].generation()
        assert gen.label == "flash-attn-4" and gen._direct_forward is None and gen._varlen_forward is None
        assert gen._backward_kernels is None and gen._varlen_kernels is None


def test_can_launch_refuses_empty_keys_without_dividing_by_zero_heads(monkeypatch):
    # asked before any launch, on every call: shapes it does not take must come back False, never raise
    monkeypatch.setattr(fa4_sm90_forward, "device_capability", lambda device: (9, 0))
    direct = Sm90Forward(StandInApi())
    q = torch.zeros(1, 8, 4, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert direct.can_launch(q, q, q)  # the control: aligned, as the real kernel would take it
    assert not direct.can_launch(q, torch.zeros(1, 8, 0, 64, dtype=torch.bfloat16), torch.zeros(1, 8, 0, 64,
                                                                                         dtype=torch.bfloat16))
    assert not direct.can_launch(q, q[:, :0], q[:, :0])
    assert not direct.can_launch(torch.zeros(1, 8, 6, 64, dtype=torch.bfloat16), q, q)  # 6 heads over 4
    wide = torch.zeros(1, 8, 4, 264, dtype=torch.bfloat16)
    assert not direct.can_launch(wide, wide, wide)  # head dim over 256
    assert not direct.can_launch(q, q, torch.zeros(1, 8, 4, 60, dtype=torch.bfloat16))  # value head dim off 8


# -- varlen launches (packed documents, a packed ring's chains) ---------------------------------------------------


class StandInVarlenApi(StandInApi):
    """STAND-IN: StandInApi whose "kernel" also takes varlen calls: (total, H, D) tensors and cu_seqlens in the
    slots after the scale, each sequence attended alone in float64, causal bottom-right as flash-attn aligns it."""

    BIN_BATCH_SEARCH_THRESH = 4

    @staticmethod
    def to_cute_tensor(t, assumed_align=16, leading_dim=-1):
        return ("cute", assumed_align, leading_dim, tuple(t.shape))

    def _compile(self, kernel, *args, options):
        dense = super()._compile(kernel, *args, options=options)  # records the compile
        causal = kernel.options["is_causal"]

        def launch(q, k, v, out, lse, scale, cu_q, cu_k, *rest):
            if cu_q is None:
                return dense(q, k, v, out, lse, scale, cu_q, cu_k, *rest)
            self.launches.append((cu_q, cu_k) + rest)
            for i in range(cu_q.shape[0] - 1):
                (a, b), (c, d) = cu_q[i:i + 2].tolist(), cu_k[i:i + 2].tolist()
                rep = q.shape[1] // k.shape[1]
                qs, ks, vs = (t.double().transpose(0, 1) for t in (q[a:b], k[c:d], v[c:d]))
                ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
                scores = qs @ ks.transpose(-1, -2) * scale
                if causal:  # bottom-right: the last query sees every key
                    scores = scores.masked_fill(torch.ones(b - a, d - c, dtype=torch.bool).triu(d - c - (b - a) + 1),
                                                -math.inf)
                out[a:b] = (scores.softmax(-1) @ vs).nan_to_num().transpose(0, 1).to(out.dtype)
                lse[:, a:b] = scores.logsumexp(-1)
        self.kernels[-1] = launch
        return launch


def _packed(lengths_q, lengths_k, hq=4, hk=2, d=16, seed=0):
    from cpattn.providers.flash.layout import Packing

    g = torch.Generator().manual_seed(seed)
    cu = lambda lengths: torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)  # noqa: E731
    q = torch.randn(sum(lengths_q), hq, d, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(sum(lengths_k), hk, d, generator=g).to(torch.bfloat16) for _ in range(2))
    return q, k, v, Packing(cu(lengths_q), cu(lengths_k), max(lengths_q), max(lengths_k))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_launch_passes_the_cu_seqlens_and_has_its_own_kernel(causal):
    api = StandInVarlenApi()
    direct = Sm90Forward(api)
    q, k, v, packing = _packed([5, 3, 7], [5, 3, 9] if causal else [2, 6, 4])
    out, lse = direct.launch_varlen(q, k, v, packing, None, causal)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (4, 15) and lse.dtype == torch.float32
    cu_q, cu_k = packing.cu_seqlens_q.tolist(), packing.cu_seqlens_k.tolist()
    for i in range(3):  # each sequence alone, against float64
        qs, ks, vs = (t.double().transpose(0, 1).unsqueeze(0) for t in (q[cu_q[i]:cu_q[i + 1]],
                                                                     k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]))
        rows, keys = qs.shape[2], ks.shape[2]
        mask = torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows) if causal else None
        want = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out[cu_q[i]:cu_q[i + 1]].double(), want[0].transpose(0, 1), atol=1e-2, rtol=0)
    kernel, args, _ = api.compiles[0]
    assert kernel.args == ("bf16", 16, 16, 2) and kernel.options["is_causal"] is causal
    # the cu_seqlens are compiled and passed where the library puts them: right after the scale
    assert args[6] == ("cute", 4, 0, (4,)) and args[7] == ("cute", 4, 0, (4,)) and args[8:15] == (None,) * 7
    assert api.launches[0][0] is packing.cu_seqlens_q and api.launches[0][1] is packing.cu_seqlens_k
    direct.launch_varlen(*_packed([2, 2], [2, 2] if causal else [1, 3], seed=1), 0.5, causal)
    assert len(api.compiles) == 1  # other lengths and counts: the same kernel
    dense = _qkv(hk=2)
    direct(*dense, None, causal, return_lse=True)
    assert len(api.compiles) == 2  # a dense call of the same class is another kernel


def test_can_launch_varlen_refuses_what_the_library_would_run_otherwise(monkeypatch):
    monkeypatch.setattr(fa4_sm90_forward, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    direct = Sm90Forward(StandInVarlenApi())
    q, k, v, packing = _packed([5, 3, 7], [5, 3, 7], d=64)
    assert direct.can_launch_varlen(q, k, v, packing)  # the control
    assert direct.can_launch_varlen(*_packed([5, 3, 7], [5, 3, 7], d=128))
    assert not direct.can_launch_varlen(*_packed([5, 3, 7], [5, 3, 7], d=96))  # a head dim the GPU check lacks
    many = _packed([1] * 5, [1] * 5, d=64)  # more sequences than the library's plain scheduler takes
    assert not direct.can_launch_varlen(*many)
    int64 = dataclasses.replace(packing, cu_seqlens_q=packing.cu_seqlens_q.long())
    assert not direct.can_launch_varlen(q, k, v, int64)
    assert not direct.can_launch_varlen(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), packing)  # dense shapes
    assert not direct.can_launch_varlen(q, k[:0], v[:0], packing)  # no keys: the library writes zeros itself
    assert not Sm90Forward(StandInApi()).can_launch_varlen(q, k, v, packing)  # a release without the limit's name
