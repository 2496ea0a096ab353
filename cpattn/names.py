"""Provider names: the public enum. Values are the exact strings users pass."""

from __future__ import annotations

import enum


class AttentionProvider(str, enum.Enum):
    NATIVE = "native"
    _NATIVE_MATH = "_native_math"
    _NATIVE_FLASH = "_native_flash"
    _NATIVE_EFFICIENT = "_native_efficient"
    _NATIVE_CUDNN = "_native_cudnn"
    FLEX = "flex"
    FLASH = "flash"
    FLASH_VARLEN = "flash_varlen"
    SAGE = "sage"
    SAGE_VARLEN = "sage_varlen"
    _SAGE_QK_INT8_PV_FP8_CUDA = "_sage_qk_int8_pv_fp8_cuda"
    _SAGE_QK_INT8_PV_FP8_CUDA_SM90 = "_sage_qk_int8_pv_fp8_cuda_sm90"
    _SAGE_QK_INT8_PV_FP16_CUDA = "_sage_qk_int8_pv_fp16_cuda"
    _SAGE_QK_INT8_PV_FP16_TRITON = "_sage_qk_int8_pv_fp16_triton"
    XFORMERS = "xformers"

    def __str__(self) -> str:  # so f-strings print the name users type
        return self.value
