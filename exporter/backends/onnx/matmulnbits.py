"""The MatMulNBits format shared by weight and embedding quantization: onnxruntime's quantizer, the blockwise
layout and its dequantization, weight identity by value, and writing a quantized model to disk."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

METADATA_KEY = "matmulnbits_linears"  # model metadata: {MatMulNBits weight name: [Linear module paths]}


def quiet_quantizer():
    """onnxruntime's ``MatMulNBitsQuantizer`` class, with its per-node INFO logging turned down."""
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def weight_key(array: np.ndarray) -> tuple:
    """Identity of a weight by value: (shape, dtype, sha1 of the bytes)."""
    array = np.ascontiguousarray(array)
    return array.shape, str(array.dtype), hashlib.sha1(array.tobytes()).hexdigest()


def save_model(proto, path: Path) -> None:
    """Write ``path`` + ``path.data`` (one external data file; the old one is replaced, not appended to)."""
    data = path.with_name(path.name + ".data")
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def dequantize_matmulnbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                           k: int, n: int, block_size: int) -> np.ndarray:
    """``W [K, N]`` float32 from MatMulNBits' ``B [N, blocks, blob]`` uint8, ``scales`` and optional packed
    uint8 ``zero_points`` (elements packed low bits first; default zero point ``2^(bits-1)``)."""
    blocks = (k + block_size - 1) // block_size
    per_byte = 8 // bits
    mask = (1 << bits) - 1

    def unpack(data: np.ndarray, count: int) -> np.ndarray:
        data = data.astype(np.uint8).reshape(n, -1)
        parts = [(data >> (bits * j)) & mask for j in range(per_byte)]
        return np.stack(parts, axis=-1).reshape(n, -1)[:, :count].astype(np.float32)

    q = unpack(packed, blocks * block_size).reshape(n, blocks, block_size)
    scales = scales.astype(np.float32).reshape(n, blocks)
    if zero_points is None:
        zp = np.full((n, blocks), float(1 << (bits - 1)), dtype=np.float32)
    elif zero_points.dtype == np.uint8:  # packed like B
        zp = unpack(zero_points, blocks)
    else:  # the same type as the scales, one per block
        zp = zero_points.astype(np.float32).reshape(n, blocks)
    weight = (q - zp[:, :, None]) * scales[:, :, None]  # [N, blocks, block]
    return weight.reshape(n, blocks * block_size)[:, :k].T.copy()
