"""gguf_codec's GGML block decoder and encoders against the gguf package's own reference
(gguf.quants.dequantize / quantize): bit-exact decodes, codes in range, encoder round trips, one-line
refusals of bad sizes and unsupported types, a seeded corruption fuzz, and the real SmolLM2 Q4_K_M file."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT, GGUFReader, GGUFWriter, quants
from gguf.constants import GGML_QUANT_SIZES

import gguf_codec
import kernels
from cli import UserError
from gguf_codec import ENCODABLE, SUPPORTED, decode_blocks, encode_blocks

LEGACY = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)
K_TYPES = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
# byte offsets of each block's f16 fields (d, and dmin or m)
F16_FIELDS = {QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
              QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}
BITS = {QT.Q4_0: 4, QT.Q4_1: 4, QT.Q5_0: 5, QT.Q5_1: 5, QT.Q8_0: 8,
        QT.Q2_K: 2, QT.Q3_K: 3, QT.Q4_K: 4, QT.Q5_K: 5, QT.Q6_K: 6}
GROUP = {QT.Q2_K: 16, QT.Q3_K: 16, QT.Q6_K: 16}  # the rest: 32
# w = d*x with a zero point inside the code range: equal values, but where x = 0 and d < 0 gguf has -0.0
# and scale*q + bias has +0.0 (see gguf_codec's notes)
SYMMETRIC = (QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q3_K, QT.Q6_K)
REAL_Q4KM = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "smollm2-q4km" / \
    "SmolLM2-135M-Instruct.Q4_K_M.gguf"


def random_blocks(tt, rows, n_cols, seed=0, scale=1.0):
    """Random bytes for `rows` rows of `n_cols` weights, the f16 fields overwritten by finite values of
    either sign (some zero)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[tt]
    data = rng.integers(0, 256, (rows, n_cols // block * size), dtype=np.uint8)
    b = data.reshape(rows, -1, size)
    for at in F16_FIELDS[tt]:
        f = (rng.standard_normal(b.shape[:2]) * scale).astype(np.float16)
        f[rng.random(b.shape[:2]) < 0.05] = 0
        b[..., at:at + 2] = f.view(np.uint8).reshape(*b.shape[:2], 2)
    return data


def quantized(tt, rows, n_cols, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, n_cols)).astype(np.float32) * rng.uniform(0.01, 3, (rows, 1))
    w[0, :32] = 0.25  # a constant block (d = 0 for the asymmetric types)
    return quants.quantize(w.astype(np.float32), tt)


def assert_exact(tt, data, n_cols):
    """decode_blocks + kernels.dequantize == gguf.quants.dequantize, bit for bit (torch.equal; for the
    symmetric types the only bit differences are gguf's -0.0 where ours is +0.0)."""
    codes, scales, biases, bits, group = decode_blocks(tt, data, n_cols)
    rows = data.shape[0]
    assert (bits, group) == (BITS[tt], GROUP.get(tt, 32))
    assert codes.dtype == torch.uint8 and codes.shape == (rows, n_cols)
    assert scales.dtype == biases.dtype == torch.float32
    assert scales.shape == biases.shape == (rows, n_cols // group)
    assert codes.numel() == 0 or int(codes.max()) < 2 ** bits
    ours = kernels.dequantize(codes, scales, biases, group)
    ref = torch.from_numpy(quants.dequantize(data, tt))
    assert torch.equal(ours, ref), f"{tt.name}: {(ours != ref).sum()} of {ref.numel()} weights differ"
    same_bits = ours.view(torch.int32) == ref.view(torch.int32)
    if tt in SYMMETRIC:
        neg_zero = (ref == 0) & torch.signbit(ref)
        assert torch.equal(~same_bits, neg_zero & ~torch.signbit(ours))
    else:
        assert same_bits.all(), f"{tt.name}: {(~same_bits).sum()} weights differ in their bits"
    return codes, scales, biases


def test_tables_match_gguf():
    assert SUPPORTED == LEGACY + K_TYPES
    for tt in SUPPORTED:
        bits, group, block, size = gguf_codec._LAYOUT[tt]
        assert GGML_QUANT_SIZES[tt] == (block, size), tt.name
        assert (bits, group) == (BITS[tt], GROUP.get(tt, 32))


@pytest.mark.parametrize("tt", LEGACY, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (8, 256)], ids=str)
def test_legacy_quantized_exact(tt, shape):
    data = quantized(tt, *shape)
    assert_exact(tt, data, shape[1])


@pytest.mark.parametrize("tt", SUPPORTED, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 256), (4, 512), (2, 1024)], ids=str)
def test_random_blocks_exact(tt, shape):
    """Every bit pattern of the codes and packed sub-block scales, d/dmin/m of either sign."""
    assert_exact(tt, random_blocks(tt, *shape, seed=shape[1]), shape[1])


@pytest.mark.parametrize("tt", SUPPORTED, ids=lambda t: t.name)
def test_extreme_f16_fields_exact(tt):
    """Largest and smallest (subnormal) f16 d/dmin: still exact products in float32."""
    data = random_blocks(tt, 4, 256, seed=7)
    size = GGML_QUANT_SIZES[tt][1]
    b = data.reshape(4, -1, size)
    for i, v in enumerate((65504.0, -65504.0, 2.0 ** -24, -(2.0 ** -14))):
        for at in F16_FIELDS[tt]:
            b[i, :, at:at + 2] = np.array([v], dtype=np.float16).view(np.uint8)
    assert_exact(tt, data, 256)


@pytest.mark.parametrize("tt", SUPPORTED, ids=lambda t: t.name)
def test_rows_of_any_count(tt):
    """No rows, and a 1-D array as one row."""
    block, size = GGML_QUANT_SIZES[tt]
    codes, scales, biases, _, group = decode_blocks(tt, np.zeros((0, 2 * size), np.uint8), 2 * block)
    assert codes.shape == (0, 2 * block) and scales.shape == (0, 2 * block // group)
    one = random_blocks(tt, 1, block)
    assert torch.equal(decode_blocks(tt, one[0], block)[0], decode_blocks(tt, one, block)[0])


def test_q3_k_hmask_set_means_no_offset():
    """gguf: x = low - 4*(1 - hmask bit), so hmask 0xFF gives x = low = q - 4, codes 4..7."""
    data = random_blocks(QT.Q3_K, 1, 256)
    data[0, :32] = 0xFF
    codes, scales, biases = assert_exact(QT.Q3_K, data, 256)
    assert int(codes.min()) >= 4
    data[0, :32] = 0
    assert int(decode_blocks(QT.Q3_K, data, 256)[0].max()) <= 3
    assert torch.equal(biases, -4 * scales)


def test_q8_0_codes_are_int8_plus_128():
    data = quantized(QT.Q8_0, 2, 64)
    codes, scales, biases = assert_exact(QT.Q8_0, data, 64)
    x = data.reshape(2, 2, 34)[..., 2:].view(np.int8).reshape(2, 64)
    assert torch.equal(codes.long() - 128, torch.from_numpy(x).long())
    assert torch.equal(biases, -128 * scales)


def test_old_decoders_unchanged():
    """q4_1_decode and q8_0_decode keep their signatures and outputs (the former torch-view versions)."""
    data = quantized(QT.Q4_1, 3, 128)
    codes, d, m = gguf_codec.q4_1_decode(data)
    b = torch.from_numpy(data).view(3, -1, 20)
    qs = b[..., 4:]
    assert torch.equal(codes, torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(3, -1))
    assert torch.equal(d, b[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1))
    assert torch.equal(m, b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1))
    data = quantized(QT.Q8_0, 3, 128)
    w = gguf_codec.q8_0_decode(data)
    assert w.dtype == torch.float32 and w.shape == (3, 128)
    assert torch.equal(w, torch.from_numpy(quants.dequantize(data, QT.Q8_0)))


# ----------------------------------------------------------------------------------------------------
# encoders

@pytest.mark.parametrize("tt", ENCODABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("n, group_size", [(32, 32), (128, 64), (256, 128), (160, 64), (96, -1)])
def test_encode_decode_round_trip(tt, n, group_size):
    g = torch.Generator().manual_seed(n)
    rows, bits = 5, BITS[tt]
    widths = kernels.group_sizes(n, group_size)
    codes = torch.randint(0, 2 ** bits, (rows, n), dtype=torch.uint8, generator=g)
    scales = torch.rand(rows, len(widths), generator=g) * 0.1 - 0.05
    biases = torch.randn(rows, len(widths), generator=g)
    data = encode_blocks(tt, codes, scales, biases, group_size)
    assert data.dtype == np.uint8 and data.shape == (rows, n // 32 * GGML_QUANT_SIZES[tt][1])
    c, s, b, bits_out, group = decode_blocks(tt, data, n)
    assert bits_out == bits and group == 32 and torch.equal(c, codes)
    per = torch.tensor(widths) // 32
    assert torch.equal(s, scales.half().float().repeat_interleave(per, dim=1))
    assert torch.equal(b, biases.half().float().repeat_interleave(per, dim=1))
    if len(set(widths)) == 1 and group_size != -1:  # group inferred from the shapes
        assert np.array_equal(encode_blocks(tt, codes, scales, biases), data)


@pytest.mark.parametrize("tt", ENCODABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("source", ["quantized", "random"])
def test_encode_gives_back_file_bytes(tt, source):
    data = quantized(tt, 6, 256) if source == "quantized" else random_blocks(tt, 6, 256, scale=100)
    codes, scales, biases, _, _ = decode_blocks(tt, data, 256)
    assert np.array_equal(encode_blocks(tt, codes, scales, biases), data)


def test_q4_1_encode_is_encode_blocks():
    codes = torch.randint(0, 16, (4, 192), dtype=torch.uint8)
    scales, biases = torch.rand(4, 3), torch.randn(4, 3)
    blocks = gguf_codec.q4_1_encode(codes, scales, biases, 64)
    assert isinstance(blocks, torch.Tensor) and blocks.shape == (4, 6 * 20)
    assert np.array_equal(blocks.numpy(), encode_blocks(QT.Q4_1, codes, scales, biases, 64))
    c, d, m = gguf_codec.q4_1_decode(blocks.numpy())
    assert torch.equal(c, codes) and torch.equal(d, scales.half().float().repeat_interleave(2, dim=1))


# ----------------------------------------------------------------------------------------------------
# refusals: one line, naming the type and the sizes

def refuses(fn, *args, match=()):
    with pytest.raises(UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    for part in match:
        assert part in msg, msg
    return msg


@pytest.mark.parametrize("tt", SUPPORTED, ids=lambda t: t.name)
def test_refuses_bad_sizes(tt):
    block, size = GGML_QUANT_SIZES[tt]
    data = random_blocks(tt, 2, 2 * block)
    refuses(decode_blocks, tt, data[:, :-1], 2 * block, match=(tt.name, str(2 * size - 1), str(2 * size)))
    refuses(decode_blocks, tt, data[:, :size], 2 * block, match=(tt.name, str(size), str(2 * size)))
    refuses(decode_blocks, tt, data, block, match=(tt.name, str(2 * size)))
    refuses(decode_blocks, tt, data, 2 * block + 16, match=(tt.name, str(2 * block + 16), str(block)))
    refuses(decode_blocks, tt, data, 0, match=(tt.name,))
    refuses(decode_blocks, tt, data, 2.5 * block, match=(tt.name,))
    refuses(decode_blocks, tt, data.view(np.int8), 2 * block, match=(tt.name, "int8"))
    refuses(decode_blocks, tt, data.tolist(), 2 * block, match=(tt.name, "list"))


@pytest.mark.parametrize("tt", [QT.IQ2_XS, QT.IQ4_NL, QT.TQ1_0, QT.MXFP4, QT.Q8_K, QT.Q8_1, QT.I32, QT.F64],
                         ids=lambda t: t.name)
def test_refuses_unsupported_types(tt):
    msg = refuses(decode_blocks, tt, np.zeros((1, 64), np.uint8), 256,
                  match=(f"tensor type {tt.name} is not supported (supported: F32, F16, BF16, Q4_0,", "Q6_K)"))
    assert gguf_codec.check_supported(QT.Q4_K) == QT.Q4_K and gguf_codec.check_supported(0) == QT.F32
    assert refuses(gguf_codec.check_supported, tt) == msg


def test_refuses_unknown_and_float_types():
    refuses(decode_blocks, 9999, np.zeros((1, 18), np.uint8), 32, match=("9999", "unknown", "Q4_0"))
    refuses(decode_blocks, "Q4_0", np.zeros((1, 18), np.uint8), 32, match=("unknown",))
    for tt in gguf_codec.FLOAT_TYPES:
        refuses(decode_blocks, tt, np.zeros((1, 64), np.uint8), 32, match=(tt.name, "plain floats"))
    assert decode_blocks(int(QT.Q4_0), np.zeros((1, 18), np.uint8), 32)[3] == 4  # the integer works too


def test_encode_refusals():
    codes = torch.randint(0, 16, (2, 64), dtype=torch.uint8)
    s, b = torch.rand(2, 2), torch.rand(2, 2)
    refuses(encode_blocks, QT.Q4_0, codes, s, b, match=("Q4_0", "Q4_1, Q5_1"))
    refuses(encode_blocks, QT.Q4_K, codes, s, b, match=("Q4_K",))
    refuses(encode_blocks, QT.IQ2_XS, codes, s, b, match=("IQ2_XS is not supported",))
    refuses(encode_blocks, QT.Q4_1, codes, torch.rand(2, 4), torch.rand(2, 4), match=("Q4_1", "16"))
    refuses(encode_blocks, QT.Q4_1, codes, s, torch.rand(2, 3), 32, match=("(2, 3)",))
    refuses(encode_blocks, QT.Q4_1, codes, torch.rand(2, 3), b, match=("64", "3"))
    refuses(encode_blocks, QT.Q4_1, codes.float(), s, b, match=("integers",))
    refuses(encode_blocks, QT.Q4_1, codes + 16, s, b, match=("[0, 16)", "31"))
    assert encode_blocks(QT.Q5_1, codes + 16, s, b).shape == (2, 48)
    refuses(encode_blocks, QT.Q5_1, codes + 17, s, b, match=("[0, 32)",))
    refuses(encode_blocks, QT.Q4_1, codes, s + 7e4, b, match=("f16",))
    refuses(encode_blocks, QT.Q4_1, codes, s, b * float("nan"), match=("f16",))
    refuses(encode_blocks, QT.Q4_1, codes[0], s, b, match=("2-D",))


# ----------------------------------------------------------------------------------------------------
# fuzz: a corrupted small file gives a result or a UserError, never another exception

def small_gguf(path):
    w = GGUFWriter(str(path), "llama")
    for i, tt in enumerate(SUPPORTED):
        block = GGML_QUANT_SIZES[tt][0]
        data = quantized(tt, 2, 2 * block, seed=i) if tt in LEGACY else random_blocks(tt, 2, 256, seed=i)
        w.add_tensor(f"t{i}", data, raw_dtype=tt)  # uint8 rows of blocks: the writer derives the shape
    w.add_tensor("f", np.ones((2, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def decode_file(path):
    n = 0
    for t in gguf_codec.gguf_reader(path).tensors:
        if t.tensor_type in gguf_codec.FLOAT_TYPES:
            continue
        n_cols = int(t.shape[0]) if len(t.shape) else 0
        try:
            codes, scales, biases, _, group = decode_blocks(t.tensor_type, t.data, n_cols)
        except UserError:
            continue
        kernels.dequantize(codes, scales, biases, group)
        n += 1
    return n


def test_fuzz_corrupted_file(tmp_path):
    path = tmp_path / "small.gguf"
    small_gguf(path)
    assert decode_file(path) == len(SUPPORTED)
    clean = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensor_start = min(t.data_offset for t in GGUFReader(str(path)).tensors)
    rng = np.random.default_rng(1234)
    outcomes = {"decoded": 0, "refused": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reader warns about its read-only memory maps
        for trial in range(60):
            raw = bytearray(clean)
            kind = trial % 3
            if kind == 0:  # flip bytes anywhere
                for at in rng.integers(0, len(raw), rng.integers(1, 8)):
                    raw[at] ^= int(rng.integers(1, 256))
            elif kind == 1:  # flip bytes in the tensor data
                for at in rng.integers(tensor_start, len(raw), rng.integers(1, 64)):
                    raw[at] = int(rng.integers(0, 256))
            else:  # truncate
                raw = raw[:int(rng.integers(0, len(raw)))]
            p = tmp_path / f"fuzz{trial}.gguf"
            p.write_bytes(bytes(raw))
            try:
                decode_file(p)
                outcomes["decoded"] += 1
            except UserError as e:
                assert "\n" not in str(e)
                outcomes["refused"] += 1
            gguf_codec._gguf_readers.clear()
    assert outcomes["decoded"] and outcomes["refused"], outcomes


def test_fuzz_arrays():
    """Random cuts of valid rows with random column counts: a result (then exact) or a UserError."""
    rng = np.random.default_rng(99)
    for trial in range(150):
        tt = SUPPORTED[trial % len(SUPPORTED)]
        block, size = GGML_QUANT_SIZES[tt]
        data = random_blocks(tt, 2, 2 * block, seed=trial)
        cut = data[:, :int(rng.integers(0, data.shape[1] + 1))]
        n_cols = int(rng.choice([cut.shape[1] // size * block, 2 * block, int(rng.integers(-1, 600))]))
        try:
            decode_blocks(tt, cut, n_cols)
        except UserError:
            continue
        assert_exact(tt, cut, n_cols)


# ----------------------------------------------------------------------------------------------------
# real files

def test_real_q4_k_m_file_exact():
    """Every quantized tensor of SmolLM2-135M-Instruct Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0), bit-exact. The
    whole tensor is checked with numpy's broadcast scale*q + bias (the same two float32 roundings as
    kernels.dequantize, which is slow on this shared machine), and a few rows of each with
    kernels.dequantize itself."""
    if not REAL_Q4KM.is_file():
        pytest.skip(f"{REAL_Q4KM} is absent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = GGUFReader(str(REAL_Q4KM))
    seen = {}
    for t in reader.tensors:
        if t.tensor_type in gguf_codec.FLOAT_TYPES:
            continue
        codes, scales, biases, bits, group = decode_blocks(t.tensor_type, t.data, int(t.shape[0]))
        rows, n = codes.shape
        assert int(codes.max()) < 2 ** bits
        ref = quants.dequantize(t.data, t.tensor_type)
        w = scales.numpy()[..., None] * codes.numpy().reshape(rows, -1, group).astype(np.float32)
        w += biases.numpy()[..., None]
        assert np.array_equal(w.reshape(rows, n), ref), t.name
        few = [0, 1, rows - 1]
        assert torch.equal(kernels.dequantize(codes[few], scales[few], biases[few], group),
                           torch.from_numpy(ref[few])), t.name
        seen[t.tensor_type.name] = seen.get(t.tensor_type.name, 0) + 1
    assert set(seen) == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}, seen


def test_real_q4_1_file_round_trip(smollm_gguf):
    """The project's own Q4_1 SmolLM2 (first blocks): decode is exact and encode gives back the bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = gguf_codec.gguf_reader(smollm_gguf)
    n = 0
    for t in reader.tensors:
        if t.tensor_type != QT.Q4_1 or not t.name.startswith(("blk.0.", "blk.1.")):
            continue
        codes, scales, biases = assert_exact(QT.Q4_1, t.data, int(t.shape[0]))
        assert np.array_equal(encode_blocks(QT.Q4_1, codes, scales, biases), t.data), t.name
        n += 1
    assert n == 14


@pytest.mark.parametrize("which", ["embedded Q4_1", "shared Q4_K_M"])
def test_reader_equals_gguf_package(which, request):
    """gguf_codec.GGUFFile reads what the gguf package's GGUFReader reads: every key with its types and value,
    every tensor's name, type, shape, offset and bytes, in file order."""
    if which == "shared Q4_K_M":
        if not REAL_Q4KM.is_file():
            pytest.skip(f"{REAL_Q4KM} is absent (../shared/models/smollm2-q4km)")
        path = str(REAL_Q4KM)
    else:
        path = request.getfixturevalue("smollm_gguf")
    ours, ref = gguf_codec.GGUFFile(path), GGUFReader(path)
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(ref_fields)
    for key, f in ref_fields.items():
        assert ours.fields[key].types == f.types, key
        assert ours.fields[key].contents() == f.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == (b.tensor_type, b.n_elements, b.n_bytes,
                                                                             b.data_offset), a.name
        assert np.array_equal(a.shape, b.shape) and a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data, b.data), a.name
