"""llama.cpp's GGUF files: a fast reader (cached), llama tensor names, the q/k row order, and GGML block types
decoded to (and encoded from) this project's codes, scales and biases."""
import hashlib
import operator
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType as VT
from gguf.quants import quant_shape_to_byte_shape

from cli import UserError
from kernels import dequantize, group_sizes

# Tensor shapes in GGUF list the fastest dimension first ([in, out] for a linear); the reader's numpy
# arrays are already [out, in] (rows of blocks, uint8, for quantized types).

GGUF_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def gguf_to_ours(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'layers.3.self_attn.q_proj.weight'."""
    parts = name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
    return f"{GGUF_NAMES[parts[0]]}.{parts[1]}"


def ours_to_gguf(name: str) -> str:
    inv = {v: k for k, v in GGUF_NAMES.items()}
    parts = name.split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{inv['.'.join(parts[2:-1])]}.{parts[-1]}"
    return f"{inv[parts[0]]}.{parts[1]}"


def permute_qk(w, n_heads: int, inverse: bool):
    """llama.cpp's converter reorders q/k rows from HF's rotate_half layout to Meta's interleaved pairs:
    per head, rows [h0..h_{d/2-1}, h_{d/2}..h_{d-1}] become [h0, h_{d/2}, h1, h_{d/2+1}, ...]:
        w.reshape(n_heads, 2, hd/2, ...).swapaxes(1, 2).reshape(w.shape)      (HF -> GGUF)
    inverse=True undoes it (GGUF -> HF). Works on any tensor whose dim 0 is the output rows."""
    shape = w.shape
    hd = shape[0] // n_heads
    if inverse:
        return w.reshape(n_heads, hd // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)
    return w.reshape(n_heads, 2, hd // 2, *shape[1:]).transpose(1, 2).reshape(shape)


# ----------------------------------------------------------------------------------------------------
# GGML block types <-> codes, scales and biases
#
# Every type below is an affine code per block or sub-block, so it is exactly w = scale * q + bias with
# q in [0, 2^bits) (kernels.dequantize). Byte layouts (offsets within one block; f16 little-endian;
# "bit k of x" counts from the least significant bit), checked against gguf.quants' dequantize_blocks:
#
#   Q4_0  18 B / 32:  d@0, qs[16]@2. q_j = nibble: j<16 low nibble of qs[j], j>=16 high nibble of qs[j-16].
#                     w = d*(q-8):             scale d, bias -8d.
#   Q4_1  20 B / 32:  d@0, m@2, qs[16]@4 (nibbles as Q4_0). w = d*q + m: scale d, bias m.
#   Q5_0  22 B / 32:  d@0, qh[4]@2, qs[16]@6. q_j = nibble_j | (bit j of the little-endian u32 qh) << 4.
#                     w = d*(q-16):            scale d, bias -16d.
#   Q5_1  24 B / 32:  d@0, m@2, qh[4]@4, qs[16]@8 (as Q5_0). w = d*q + m: scale d, bias m.
#   Q8_0  34 B / 32:  d@0, int8 x[32]@2. w = d*x. Code q = x + 128 (the byte XOR 0x80): scale d, bias -128d.
#   Q2_K  84 B / 256: scales[16]@0, qs[64]@16, d@80, dmin@82. Weight i = 128h + 32s + l (h<2, s<4, l<32)
#                     is bits 2s..2s+1 of qs[32h+l]; sub-block j = i//16 has sc_j = scales[j] & 15 and
#                     m_j = scales[j] >> 4. w = d*sc_j*q - dmin*m_j: scale d*sc_j, bias -dmin*m_j.
#   Q3_K  110 B / 256: hmask[32]@0, qs[64]@32, scales[12]@96, d@108. Low 2 bits of weight i as Q2_K;
#                     weight i = 32k + l has its high bit in bit k of hmask[l]. gguf computes
#                     x = low - 4*(1 - high): a SET hmask bit means no offset. So q = low | high << 2 and
#                     x = q - 4. Sub-block j = i//16: 6-bit s_j = low4 | hi2 << 4, low4 = nibble (j<8: low
#                     nibble of scales[j], else high nibble of scales[j-8]), hi2 = bits 2k..2k+1 of
#                     scales[8 + j%4] with k = j//4. w = d*(s_j-32)*x: scale d*(s_j-32), bias -4*scale.
#   Q4_K  144 B / 256: d@0, dmin@2, scales[12]@4, qs[128]@16. Weight i = 64c + 32s + l is nibble s of
#                     qs[32c+l]; sub-block j = i//32 (8 of them). 6-bit scale/min (get_scale_min_k4):
#                     j<4: sc = b[j] & 63, m = b[j+4] & 63; j>=4: sc = (b[j+4] & 15) | (b[j-4] >> 6) << 4,
#                     m = (b[j+4] >> 4) | (b[j] >> 6) << 4. w = d*sc_j*q - dmin*m_j:
#                     scale d*sc_j, bias -dmin*m_j.
#   Q5_K  176 B / 256: d@0, dmin@2, scales[12]@4, qh[32]@16, qs[128]@48. Low nibble as Q4_K; weight
#                     i = 32k + l has its 5th bit in bit k of qh[l]. Scales as Q4_K.
#   Q6_K  210 B / 256: ql[128]@0, qh[64]@128, int8 scales[16]@192, d@208. Weight i = 128h + 64s + l
#                     (l<64) has low nibble s of ql[64h+l]; weight i = 128h + 32k + l (l<32) has its high
#                     2 bits in bits 2k..2k+1 of qh[32h+l]. x = q - 32; sub-block j = i//16.
#                     w = d*sc_j*x: scale d*sc_j, bias -32*scale.
#
# Bit-exactness: every product here (f16 times integers of at most 8 bits of scale and 6 of code) is
# exact in float32, so kernels.dequantize's `scale*q + bias` rounds once, at the add, exactly like gguf's
# `d*q + m` / `dl*q - ml` (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K: identical bits, signed zeros included). For the
# symmetric types (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K) gguf's d*x is exact and so is scale*q + bias, hence equal
# values; the only possible difference is the sign of a zero: where x = 0 and the scale is negative gguf
# gives -0.0 and scale*q + bias gives +0.0 (an exact zero sum rounds to +0). No affine form can give -0.0
# there. With a non-finite f16 d/dmin/m (never in a real model) the values differ too (inf*q - c*inf is
# NaN where gguf has +-inf).

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
# type: (bits, group, weights per block, bytes per block)
_LAYOUT = {QT.Q4_0: (4, 32, 32, 18), QT.Q4_1: (4, 32, 32, 20), QT.Q5_0: (5, 32, 32, 22),
           QT.Q5_1: (5, 32, 32, 24), QT.Q8_0: (8, 32, 32, 34), QT.Q2_K: (2, 16, 256, 84),
           QT.Q3_K: (3, 16, 256, 110), QT.Q4_K: (4, 32, 256, 144), QT.Q5_K: (5, 32, 256, 176),
           QT.Q6_K: (6, 16, 256, 210)}
SUPPORTED = tuple(_LAYOUT)  # the quantized types decode_blocks decodes
ENCODABLE = (QT.Q4_1, QT.Q5_1)  # the types encode_blocks writes: a free f16 scale and offset per block
_F16 = np.dtype("<f2")


def _type_list():
    return ", ".join(t.name for t in FLOAT_TYPES + SUPPORTED)


def check_supported(tensor_type) -> QT:
    """The GGMLQuantizationType of `tensor_type` (an enum or its integer) if this project reads it (a float
    type or one of SUPPORTED); otherwise one UserError naming the type and what is supported."""
    try:
        tt = QT(tensor_type)
    except (ValueError, TypeError):
        raise UserError(f"tensor type {tensor_type!r} is unknown (supported: {_type_list()})") from None
    if tt not in FLOAT_TYPES and tt not in _LAYOUT:
        raise UserError(f"tensor type {tt.name} is not supported (supported: {_type_list()})")
    return tt


def _block_type(tensor_type) -> QT:
    tt = check_supported(tensor_type)
    if tt in FLOAT_TYPES:
        raise UserError(f"tensor type {tt.name} holds plain floats, not quantized blocks "
                        f"(blocks: {', '.join(t.name for t in SUPPORTED)})")
    return tt


def _f16(b, at):
    """The f16 field at byte `at` of every block: [..., type_size] uint8 -> float32 [...]."""
    return np.ascontiguousarray(b[..., at:at + 2]).view(_F16)[..., 0].astype(np.float32)


def _fields(x, width, count):
    """[..., k] uint8 -> [..., count, k]: field t of each byte is bits [width*t, width*(t+1))."""
    shifts = (np.arange(count, dtype=np.uint8) * np.uint8(width))[:, None]
    return (x[..., None, :] >> shifts) & np.uint8((1 << width) - 1)


def _scale_min_k4(s):
    """Q4_K/Q5_K's 12 bytes of packed 6-bit (scale, min) pairs [..., 12] -> two uint8 [..., 8]."""
    a, m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate((a & 63, (hi & 15) | ((a >> 6) << 4)), axis=-1)
    mn = np.concatenate((m & 63, (hi >> 4) | ((m >> 6) << 4)), axis=-1)
    return sc, mn


def _f32(x):
    return x.astype(np.float32)


# each: blocks [rows, nb, type_size] uint8 -> (codes uint8 [rows, nb, block], scale, bias f32 [rows, nb, n_sub])
def _q4_0(b):
    d = _f16(b, 0)[..., None]
    return _fields(b[..., 2:18], 4, 2), d, d * -8


def _q4_1(b):
    return _fields(b[..., 4:20], 4, 2), _f16(b, 0)[..., None], _f16(b, 2)[..., None]


def _q5(qh, qs):
    return _fields(qs, 4, 2).reshape(*qs.shape[:-1], 32) | (np.unpackbits(qh, axis=-1, bitorder="little") << 4)


def _q5_0(b):
    d = _f16(b, 0)[..., None]
    return _q5(b[..., 2:6], b[..., 6:22]), d, d * -16


def _q5_1(b):
    return _q5(b[..., 4:8], b[..., 8:24]), _f16(b, 0)[..., None], _f16(b, 2)[..., None]


def _q8_0(b):
    d = _f16(b, 0)[..., None]
    return b[..., 2:34] ^ np.uint8(0x80), d, d * -128


def _q2_k(b):
    rows, nb = b.shape[:2]
    sc = b[..., 0:16]
    codes = _fields(b[..., 16:80].reshape(rows, nb, 2, 32), 2, 4)              # [rows, nb, 2, 4, 32]
    scale = _f16(b, 80)[..., None] * _f32(sc & 15)
    bias = -(_f16(b, 82)[..., None] * _f32(sc >> 4))
    return codes, scale, bias


def _q3_k(b):
    rows, nb = b.shape[:2]
    low = _fields(b[..., 32:96].reshape(rows, nb, 2, 32), 2, 4).reshape(rows, nb, 256)
    high = _fields(b[..., 0:32], 1, 8).reshape(rows, nb, 256)
    s = b[..., 96:108]
    s6 = (_fields(s[..., 0:8], 4, 2).reshape(rows, nb, 16)
          | (_fields(s[..., 8:12], 2, 4).reshape(rows, nb, 16) << 4))
    scale = _f16(b, 108)[..., None] * (_f32(s6) - 32)
    return low | (high << 2), scale, scale * -4


def _k4_scales(b):
    sc, mn = _scale_min_k4(b[..., 4:16])
    return _f16(b, 0)[..., None] * _f32(sc), -(_f16(b, 2)[..., None] * _f32(mn))


def _q4_k(b):
    rows, nb = b.shape[:2]
    return (_fields(b[..., 16:144].reshape(rows, nb, 4, 32), 4, 2), *_k4_scales(b))


def _q5_k(b):
    rows, nb = b.shape[:2]
    low = _fields(b[..., 48:176].reshape(rows, nb, 4, 32), 4, 2).reshape(rows, nb, 256)
    high = _fields(b[..., 16:48], 1, 8).reshape(rows, nb, 256)
    return (low | (high << 4), *_k4_scales(b))


def _q6_k(b):
    rows, nb = b.shape[:2]
    low = _fields(b[..., 0:128].reshape(rows, nb, 2, 64), 4, 2).reshape(rows, nb, 256)
    high = _fields(b[..., 128:192].reshape(rows, nb, 2, 32), 2, 4).reshape(rows, nb, 256)
    scale = _f16(b, 208)[..., None] * _f32(b[..., 192:208].view(np.int8))
    return low | (high << 4), scale, scale * -32


_DECODERS = {QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1, QT.Q8_0: _q8_0,
             QT.Q2_K: _q2_k, QT.Q3_K: _q3_k, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k}


def _block_geometry(tt, n_cols):
    bits, group, block, size = _LAYOUT[tt]
    try:
        n = operator.index(n_cols)
    except TypeError:
        raise UserError(f"{tt.name}: the column count must be an integer, got {n_cols!r}") from None
    if n <= 0 or n % block:
        raise UserError(f"{tt.name}: a row of {n} columns is not a whole number of {block}-weight blocks")
    return n, bits, group, block, size


def decode_blocks(tensor_type, data, n_cols):
    """A GGML quantized tensor as this project's affine code. tensor_type: a GGMLQuantizationType in
    SUPPORTED; data: the reader's uint8 array [rows, bytes_per_row] (rows of blocks; leading dims beyond
    one are flattened into rows, a 1-D array is one row); n_cols: weights per row.
    -> (codes uint8 [rows, n_cols] in [0, 2^bits), scales f32 [rows, n_cols//group], biases f32 (same),
    bits, group), with kernels.dequantize(codes, scales, biases, group) equal to gguf.quants.dequantize
    (see the table above). A wrong type, length or shape: one UserError naming the type and the sizes."""
    tt = _block_type(tensor_type)
    n, bits, group, block, size = _block_geometry(tt, n_cols)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim < 1:
        what = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise UserError(f"{tt.name}: tensor data must be a uint8 array of rows of blocks, got {what}")
    nb = n // block
    if data.shape[-1] != nb * size:
        raise UserError(f"{tt.name}: a row of {n} columns takes {nb * size} bytes ({nb} blocks of {size}), "
                        f"but the data has {data.shape[-1]} bytes per row (shape {tuple(data.shape)})")
    rows = int(np.prod(data.shape[:-1], dtype=np.int64))
    with np.errstate(all="ignore"):  # non-finite f16 fields decode as they are, without a warning
        codes, scales, biases = _DECODERS[tt](np.asarray(data).reshape(rows, nb, size))
    as_torch = lambda a, cols: torch.from_numpy(np.ascontiguousarray(a).reshape(rows, cols))  # noqa: E731
    return as_torch(codes, n), as_torch(scales, n // group), as_torch(biases, n // group), bits, group


def encode_blocks(tensor_type, codes, scales, biases, group_size=None):
    """codes [rows, n] (integers in [0, 2^bits)), scales and biases [rows, n_groups] -> the tensor's GGML
    blocks, numpy uint8 [rows, n/32 * type_size], for Q4_1 (4 bits) and Q5_1 (5 bits): per block of 32,
    d = f16(scale), m = f16(bias) and the codes untouched; a group 64 or 128 wide is written as 2 or 4
    blocks repeating its (d, m). group_size (as kernels.group_sizes takes it: -1 for a whole row, a short
    last group allowed) defaults to n / n_groups. Every group must be a multiple of 32 wide, and d and m
    finite in f16; otherwise one UserError. decode_blocks gives back the codes and the f16-rounded scales
    and biases, and re-encoding a decoded Q4_1/Q5_1 tensor gives back its bytes."""
    tt = _block_type(tensor_type)
    if tt not in ENCODABLE:
        raise UserError(f"encoding {tt.name} is not supported (encodable: "
                        f"{', '.join(t.name for t in ENCODABLE)}: a free f16 scale and offset per block)")
    bits = _LAYOUT[tt][0]
    codes, scales, biases = (torch.as_tensor(t).detach().cpu() for t in (codes, scales, biases))
    if codes.dim() != 2 or scales.dim() != 2:
        raise UserError(f"{tt.name}: codes and scales must be 2-D, got {tuple(codes.shape)} and "
                        f"{tuple(scales.shape)}")
    rows, n = codes.shape
    if group_size is None:
        n_groups = scales.shape[1]
        if n_groups == 0 or n % n_groups:
            raise UserError(f"{tt.name}: {n} columns do not split into {n_groups} equal groups; pass group_size")
        group_size = n // n_groups
    widths = group_sizes(n, group_size) if n else []
    if tuple(scales.shape) != (rows, len(widths)) or tuple(biases.shape) != (rows, len(widths)):
        raise UserError(f"{tt.name}: scales {tuple(scales.shape)} and biases {tuple(biases.shape)} do not "
                        f"match codes {tuple(codes.shape)} in groups of {group_size}")
    if any(w % 32 for w in widths):
        raise UserError(f"{tt.name} writes blocks of 32: {n} columns in groups of {group_size} give group "
                        f"widths {sorted(set(widths))}, not all multiples of 32")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise UserError(f"{tt.name}: codes must be integers, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise UserError(f"{tt.name}: codes must lie in [0, {1 << bits}), got [{int(codes.min())}, "
                        f"{int(codes.max())}]")
    nb = n // 32
    per = torch.tensor(widths, dtype=torch.long) // 32                            # blocks per group
    d = scales.float().to(torch.float16).repeat_interleave(per, dim=1)             # [rows, nb]
    m = biases.float().to(torch.float16).repeat_interleave(per, dim=1)
    if not (torch.isfinite(d).all() and torch.isfinite(m).all()):
        raise UserError(f"{tt.name}: a scale or bias is not finite in f16 (|x| > 65504, inf or NaN)")
    f16_bytes = lambda t: t.numpy().astype(_F16).view(np.uint8).reshape(rows, nb, 2)  # noqa: E731
    q = codes.to(torch.uint8).numpy().reshape(rows, nb, 32)
    qs = (q[..., :16] & np.uint8(15)) | ((q[..., 16:] & np.uint8(15)) << np.uint8(4))  # [rows, nb, 16]
    parts = [f16_bytes(d), f16_bytes(m)]
    if tt == QT.Q5_1:
        parts.append(np.packbits(q >> np.uint8(4), axis=-1, bitorder="little"))     # [rows, nb, 4]
    return np.concatenate(parts + [qs], axis=-1).reshape(rows, nb * _LAYOUT[tt][3])



def q4_1_decode(blocks: np.ndarray):
    """Q4_1 rows [rows, n_blocks*20] uint8 -> (codes uint8 [rows, n_blocks*32], d f32, m f32 [rows, n_blocks])."""
    n_cols = blocks.shape[-1] // 20 * 32 if blocks.ndim else 0
    codes, d, m, _, _ = decode_blocks(QT.Q4_1, blocks, n_cols)
    return codes, d, m


def q8_0_decode(blocks: np.ndarray) -> torch.Tensor:
    """Q8_0 rows [rows, n_blocks*34] uint8 -> the weights, float32 [rows, n_blocks*32] (d * int8 q)."""
    n_cols = blocks.shape[-1] // 34 * 32 if blocks.ndim else 0
    codes, s, b, _, group = decode_blocks(QT.Q8_0, blocks, n_cols)
    return dequantize(codes, s, b, group)


def is_gguf(path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


# -----------------------------------------------------------------------------
# Reading a GGUF file. The gguf package's GGUFReader makes a numpy view for every part of every value: for
# SmolLM2's 49K-token vocabulary and 49K merges that is a million views and 5 s. This reader parses the
# header with struct and keeps one memory map for the tensor data; its fields and tensors carry the
# attributes of GGUFReader's that this project uses (tests/test_gguf_codec.py compares the two).

GGUF_MAGIC, GGUF_DEFAULT_ALIGNMENT = b"GGUF", 32
_SCALARS = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
            VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d"}
_TENSOR_DTYPES = {QT.F32: np.float32, QT.F16: np.float16, QT.F64: np.float64, QT.I8: np.int8, QT.I16: np.int16,
                  QT.I32: np.int32, QT.I64: np.int64}


class GGUFField(NamedTuple):
    """One metadata key: types [type] or [ARRAY, element type] (GGUFReader's), value a Python value or list."""
    name: str
    types: list
    value: object

    def contents(self):
        return self.value


class GGUFTensor(NamedTuple):
    """One tensor: shape in GGUF order (fastest dimension first); data a read-only numpy view of the file, as
    GGUFReader gives it: [..., out, in] elements for float and integer types, rows of blocks (uint8) else."""
    name: str
    tensor_type: QT
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class _Cursor:
    def __init__(self, buf):
        self.buf, self.at = buf, 0

    def take(self, fmt):
        return self.take_n(fmt, 1)[0]

    def take_n(self, fmt, n):
        v = struct.unpack_from(f"<{n}{fmt}", self.buf, self.at)
        self.at += struct.calcsize(f"<{n}{fmt}")
        return v

    def string(self):  # called once per vocabulary entry: no struct, one bounds check
        at, buf = self.at, self.buf
        n = int.from_bytes(buf[at:at + 8], "little")
        s = buf[at + 8:at + 8 + n]
        if at + 8 + n > len(buf):
            raise ValueError(f"string of {n} bytes runs past the end of the file")
        self.at = at + 8 + n
        return str(s, "utf-8")

    def value(self, vtype):
        """(types, value) of one value of GGUF type `vtype`."""
        vtype = VT(vtype)
        if vtype == VT.STRING:
            return [vtype], self.string()
        if vtype in _SCALARS:
            return [vtype], self.take(_SCALARS[vtype])
        if vtype != VT.ARRAY:
            raise ValueError(f"unknown value type {vtype}")
        etype, n = VT(self.take("I")), self.take("Q")
        if etype in _SCALARS:  # numeric arrays at once
            dtype = np.dtype("<" + _SCALARS[etype])
            arr = np.frombuffer(self.buf, dtype, n, self.at)
            self.at += n * dtype.itemsize
            return [vtype, etype], arr.tolist()
        if etype == VT.STRING:  # vocabularies
            return [vtype, etype], [self.string() for _ in range(n)]
        items = [self.value(etype) for _ in range(n)]
        return [vtype] + (items[0][0] if items else [etype]), [v for _, v in items]


class GGUFFile:
    """`fields` {key: GGUFField} in file order (GGUFReader's GGUF.* entries excepted) and `tensors`, a list of
    GGUFTensor in file order. Raises ValueError or struct.error on a malformed file."""

    def __init__(self, path):
        self.data = np.memmap(path, mode="r")
        c = _Cursor(memoryview(self.data))
        if bytes(self.data[:4]) != GGUF_MAGIC:
            raise ValueError("not a GGUF file (no GGUF magic)")
        c.at = 4
        version, n_tensors, n_kv = c.take("I"), c.take("Q"), c.take("Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are; a big-endian file reads "
                             f"as a huge version)")
        self.fields = {}
        for _ in range(n_kv):
            key = c.string()
            types, value = c.value(c.take("I"))
            self.fields[key] = GGUFField(key, types, value)
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = np.array(c.take_n("Q", c.take("I")), dtype=np.uint64)
            infos.append((name, dims, QT(c.take("I")), c.take("Q")))
        align = self.fields.get("general.alignment")
        align = GGUF_DEFAULT_ALIGNMENT if align is None else align.value
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {align!r} is not a power of two")
        start = -(-c.at // align) * align
        self.tensors, seen = [], set()
        for name, dims, ttype, offset in infos:
            if name in seen:
                raise ValueError(f"tensor {name} appears twice")
            seen.add(name)
            n_el = int(np.prod(dims))
            block, size = GGML_QUANT_SIZES[ttype]
            n_bytes, at = n_el * size // block, start + offset
            np_dims = tuple(int(d) for d in reversed(dims))
            if at + n_bytes > len(self.data):
                raise ValueError(f"tensor {name} runs past the end of the file")
            if ttype in _TENSOR_DTYPES:
                dtype = np.dtype(_TENSOR_DTYPES[ttype])
                data = self.data[at:at + n_bytes].view(dtype).reshape(np_dims)
            else:
                data = self.data[at:at + n_bytes].reshape(quant_shape_to_byte_shape(np_dims, ttype))
            self.tensors.append(GGUFTensor(name, ttype, dims, n_el, n_bytes, at, data))


_gguf_readers = {}


def gguf_reader(path):
    """The GGUFFile of `path`, kept for the last file read: the model loader and the tokenizer both need it.
    Keyed by path, inode, size, times and a hash of the first and last 64 KB (all of a small file: timestamps
    alone can miss a same-size rewrite within one clock tick), so a rewritten file is read again. Corrupt:
    one UserError."""
    st = os.stat(path)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        f.seek(max(st.st_size - (1 << 16), len(head)))
        digest = hashlib.sha1(head + f.read()).hexdigest()
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest)
    if key not in _gguf_readers:
        try:
            reader = GGUFFile(str(path))
        except (ValueError, struct.error, KeyError, IndexError, OverflowError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read GGUF file {path}: {e}") from None
        _gguf_readers.clear()
        _gguf_readers[key] = reader
    return _gguf_readers[key]


def q4_1_encode(codes, scales, biases, group_size):
    """4-bit codes [out, in], scales and biases [out, n_groups] with every group a multiple of 32 wide ->
    Q4_1 rows uint8 torch [out, in/32 * 20]: a group of 64 or 128 is written as 2 or 4 blocks repeating its
    (d, m). Rounding d and m to f16 is the only loss."""
    return torch.from_numpy(encode_blocks(QT.Q4_1, codes, scales, biases, group_size))
