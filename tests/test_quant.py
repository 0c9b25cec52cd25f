"""quant.py against naive references: RTN, packing, GPTQ, QuantLinear, quantize_model, SmolLM2's Q4_1."""
import math

import numpy as np
import pytest
import torch

import quant
import quantize


# ----------------------------------------------------------------------------- naive references

def naive_rtn(w, bits, group_size):
    """Per (row, group) min-max RTN with python loops."""
    out, n = w.shape
    gs = n if group_size == -1 else group_size
    q = torch.zeros(out, n, dtype=torch.uint8)
    G = math.ceil(n / gs)
    scales, biases = torch.zeros(out, G), torch.zeros(out, G)
    for o in range(out):
        for g in range(G):
            seg = w[o, g * gs:(g + 1) * gs]
            lo, hi = seg.min(), seg.max()
            s = (hi - lo) / (2**bits - 1)
            scales[o, g], biases[o, g] = s, lo
            for j, v in enumerate(seg):
                code = 0 if s == 0 else int(torch.round((v - lo) / s).clamp(0, 2**bits - 1))
                q[o, g * gs + j] = code
    return q, scales, biases


def naive_pack(q, bits):
    out, n = q.shape
    nbytes = (n * bits + 7) // 8
    packed = torch.zeros(out, nbytes, dtype=torch.uint8)
    for o in range(out):
        buf = [0] * nbytes
        for j in range(n):
            for t in range(bits):
                b = j * bits + t
                buf[b // 8] |= ((int(q[o, j]) >> t) & 1) << (b % 8)
        packed[o] = torch.tensor(buf, dtype=torch.uint8)
    return packed


def objective(w, w_hat, H):
    d = (w - w_hat).double()
    return torch.trace(d @ H.double() @ d.T).item()


# ----------------------------------------------------------------------------- RTN

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("n,group_size", [(64, 32), (172, 32), (96, 128), (100, -1), (576, 128), (7, 3)])
def test_rtn_matches_naive_and_error_bound(bits, n, group_size):
    w = torch.randn(5, n) * 0.1
    q, scales, biases = quant.quantize(w, bits, group_size)
    G = math.ceil(n / (n if group_size == -1 else group_size))
    assert q.dtype == torch.uint8 and q.shape == w.shape
    assert scales.shape == biases.shape == (5, G) and scales.dtype == biases.dtype == torch.float32
    qn, sn, bn = naive_rtn(w, bits, group_size)
    assert torch.equal(scales, sn) and torch.equal(biases, bn)
    assert torch.equal(q, qn)
    w_hat = quant.dequantize(q, scales, biases, group_size)
    gs = n if group_size == -1 else group_size
    s_col = scales.repeat_interleave(gs, dim=1)[:, :n]
    assert ((w - w_hat).abs() <= s_col / 2 * (1 + 1e-5) + 1e-7).all()
    assert q.max() <= 2**bits - 1


def test_rtn_group_sizes_and_short_group():
    assert quant.group_sizes(172, 32) == [32] * 5 + [12]
    assert quant.group_sizes(576, 128) == [128] * 4 + [64]
    assert quant.group_sizes(64, -1) == [64]
    assert quant.group_sizes(20, 64) == [20]
    w = torch.randn(3, 172)
    q, s, b = quant.quantize(w, 4, 32)
    # the short last group's parameters come from its own 12 columns only
    assert torch.equal(b[:, -1], w[:, 160:].min(dim=1).values)
    assert torch.allclose(s[:, -1], (w[:, 160:].max(dim=1).values - w[:, 160:].min(dim=1).values) / 15)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_constant_group_is_exact(bits):
    w = torch.randn(4, 64)
    w[1, 32:] = 0.3712
    w[2, :32] = -1.25
    w[3] = 0.0
    q, s, b = quant.quantize(w, bits, 32)
    assert s[1, 1] == 0 and s[2, 0] == 0 and (s[3] == 0).all()
    w_hat = quant.dequantize(q, s, b, 32)
    assert not torch.isnan(w_hat).any()
    assert torch.equal(w_hat[1, 32:], w[1, 32:]) and torch.equal(w_hat[2, :32], w[2, :32])
    assert torch.equal(w_hat[3], w[3])


def test_group_ends_are_exact():
    """min-max: each group's minimum is reproduced exactly (code 0 -> bias)."""
    w = torch.randn(8, 96)
    q, s, b = quant.quantize(w, 4, 32)
    w_hat = quant.dequantize(q, s, b, 32)
    mins = w.view(8, 3, 32).amin(dim=2)
    assert torch.equal(w_hat.view(8, 3, 32).amin(dim=2), mins)


@pytest.mark.parametrize("bad", [dict(bits=7, group_size=32), dict(bits=4, group_size=0),
                                 dict(bits=4, group_size=-2), dict(bits=4, group_size=3.5)])
def test_bad_arguments_raise_clearly(bad):
    with pytest.raises(Exception, match="bits|group_size"):
        quant.quantize(torch.randn(2, 8), **bad)


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("n", [1, 5, 7, 8, 13, 32, 172])
def test_pack_matches_naive_and_round_trips(bits, n):
    q = torch.randint(0, 2**bits, (3, n), dtype=torch.uint8)
    packed = quant.pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, (n * bits + 7) // 8)
    assert torch.equal(packed, naive_pack(q, bits))
    assert torch.equal(quant.unpack(packed, bits, n), q)


def test_pack_layout_examples():
    assert quant.pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]  # low nibble first
    assert quant.pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]
    # 3 bits: codes 0..7 -> stream 000 100 010 110 001 101 011 111 (LSB first) = 3 bytes, no waste
    packed = quant.pack(torch.arange(8, dtype=torch.uint8)[None], 3)
    assert packed.tolist() == [[0x88, 0xC6, 0xFA]]


# ----------------------------------------------------------------------------- GPTQ

def correlated_hessian(n_in, n=2048, rank=8, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank, generator=g) @ torch.randn(rank, n_in, generator=g)  # low rank
    X = X + noise * torch.randn(n, n_in, generator=g)
    X = X * torch.rand(n_in, generator=g) * 2  # uneven column scales so act-order matters
    return X.T @ X / n


@pytest.mark.parametrize("bits,group_size,n", [(4, 32, 96), (3, 32, 172), (2, 16, 40), (4, -1, 64), (8, 64, 130)])
def test_gptq_identity_hessian_equals_rtn(bits, group_size, n):
    w = torch.randn(16, n)
    H = 3.0 * torch.eye(n)
    for block_size in (128, 20):  # also groups straddling blocks
        q, s, b = quant.gptq(w, H, bits, group_size, block_size=block_size)
        qr, sr, br = quant.quantize(w, bits, group_size)
        assert torch.equal(q, qr) and torch.equal(s, sr) and torch.equal(b, br)
    q, s, b = quant.gptq(w, H, bits, group_size, act_order=True, static_groups=True)
    assert torch.equal(q, qr) and torch.equal(s, sr) and torch.equal(b, br)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,group_size,block_size", [(128, 32, 128), (172, 32, 48)])
def test_gptq_beats_rtn_on_correlated_hessian(bits, n, group_size, block_size):
    w = torch.randn(64, n)
    H = correlated_hessian(n)
    rtn = objective(w, quant.dequantize(*quant.quantize(w, bits, group_size), group_size), H)
    for kw in (dict(), dict(act_order=True, static_groups=True), dict(static_groups=True)):
        q, s, b = quant.gptq(w, H, bits, group_size, block_size=block_size, **kw)
        assert q.shape == w.shape and s.shape == b.shape == (64, math.ceil(n / group_size))
        assert q.max() <= 2**bits - 1
        err = objective(w, quant.dequantize(q, s, b, group_size), H)
        assert err < 0.7 * rtn, (kw, err, rtn)


def test_gptq_act_order_needs_static_groups():
    with pytest.raises(Exception, match="static_groups"):
        quant.gptq(torch.randn(4, 32), torch.eye(32), 4, 16, act_order=True)


def test_gptq_dead_columns_and_cholesky_retry(capsys):
    w = torch.randn(8, 32)
    H = correlated_hessian(32)
    H[5, :] = H[:, 5] = 0  # an input that never fired
    q, s, b = quant.gptq(w, H, 4, 16)
    assert torch.isfinite(quant.dequantize(q, s, b, 16)).all()
    # an indefinite Hessian: retried with more dampening, with a warning
    Hbad = torch.eye(32)
    Hbad[0, 0] = -0.5
    q, s, b = quant.gptq(w, Hbad, 4, 16, damp=0.01)
    assert "retrying" in capsys.readouterr().err
    assert torch.isfinite(s).all()


# ----------------------------------------------------------------------------- QuantLinear

@pytest.mark.parametrize("bits,group_size,n", [(4, 32, 64), (3, 32, 172), (2, -1, 40), (8, 128, 96)])
def test_quantlinear_forward_matches_dequantized_matmul(bits, group_size, n):
    lin = torch.nn.Linear(n, 24, bias=False)
    ql = quant.QuantLinear.from_linear(lin, bits, group_size)
    q, s, b = quant.quantize(lin.weight, bits, group_size)
    assert torch.equal(ql.codes(), q)
    assert ql.group_size == (n if group_size == -1 else min(group_size, n)) and ql.n_groups == s.shape[1]
    w_hat = quant.dequantize(q, s, b, group_size)
    assert torch.equal(ql.dequantize_weight(), w_hat)
    assert not hasattr(ql, "weight")
    x = torch.randn(2, 5, n)
    ql.impl = "reference"
    torch.testing.assert_close(ql(x), x @ w_hat.T, rtol=1e-5, atol=1e-5)
    # buffers round-trip through a state dict
    ql2 = quant.QuantLinear(n, 24, bits, group_size)
    ql2.load_state_dict(ql.state_dict())
    assert torch.equal(ql2.dequantize_weight(), w_hat)


# ----------------------------------------------------------------------------- whole models

def _tiny_model(tiny_args, **kw):
    from model import Transformer
    torch.manual_seed(0)
    m = Transformer(tiny_args(**kw))
    for name, p in m.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.05)
    return m.eval()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_model_tiny(tiny_args, method):
    from quant import QuantLinear
    ref = _tiny_model(tiny_args, hidden_dim=100)  # 100 % 32 != 0: down_proj has a short group
    model = _tiny_model(tiny_args, hidden_dim=100)
    tokens = torch.randint(0, 128, (2, 24))
    calib = torch.randint(0, 128, (8, 32))
    with torch.no_grad():
        y_ref = ref(tokens)
        quant.quantize_model(model, 8, 32, method=method, calib=calib, progress=False)
        y = model(tokens)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 7 * 2 and not isinstance(model.lm_head, QuantLinear)
    assert model.quantization == {"bits": 8, "group_size": 32, "method": method, "format": "affine"}
    assert (y - y_ref).abs().max() < 0.05 * y_ref.abs().max()


def test_gptq_model_beats_rtn_tiny(tiny_args):
    """On the calibration data itself, GPTQ's 3-bit model tracks the float model better than RTN's."""
    ref = _tiny_model(tiny_args)
    calib = torch.randint(0, 128, (16, 32))
    with torch.no_grad():
        y_ref = ref(calib)
        errs = {}
        for method in ("rtn", "gptq"):
            m = _tiny_model(tiny_args)
            quant.quantize_model(m, 3, 16, method=method, calib=calib, progress=False)
            errs[method] = (m(calib) - y_ref).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"], errs


def test_quantize_model_gptq_needs_calib(tiny_args):
    with pytest.raises(Exception, match="calib"):
        quant.quantize_model(_tiny_model(tiny_args), 4, 32, method="gptq")


def test_quantized_checkpoint_round_trip(tiny_args, tmp_path):
    from model import Transformer
    model = _tiny_model(tiny_args, hidden_dim=100)
    quant.quantize_model(model, 3, 32, method="rtn")
    model.save_pretrained(tmp_path / "q")
    back = Transformer.from_pretrained(tmp_path / "q")
    assert back.quantization == model.quantization
    for (n1, m1), (n2, m2) in zip(model.named_modules(), back.named_modules()):
        if isinstance(m1, quant.QuantLinear):
            assert isinstance(m2, quant.QuantLinear) and n1 == n2
            assert torch.equal(m1.qweight, m2.qweight) and torch.equal(m1.scales, m2.scales)
            assert torch.equal(m1.biases, m2.biases)
    tokens = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens), back(tokens))


# ----------------------------------------------------------------------------- SmolLM2 (a llama.cpp Q4_1 file)

def _check_gguf_q4_1_round_trip(path, blocks=None):
    from gguf import GGMLQuantizationType as QT, GGUFReader
    from gguf_codec import q4_1_decode
    n_checked = 0
    for t in GGUFReader(path).tensors:
        if t.tensor_type != QT.Q4_1 or (blocks is not None and t.name.split(".")[1] not in blocks):
            continue
        codes, d, m = q4_1_decode(t.data)  # file order; RTN is per row and group, so row order is irrelevant
        w = quant.dequantize(codes, d, m, 32)  # what from_pretrained(gguf) loads
        q, s, b = quant.quantize(w, 4, 32)
        assert torch.equal(quant.dequantize(q, s, b, 32), w), t.name
        assert torch.equal(q, codes) and torch.equal(s, d) and torch.equal(b, m), t.name
        n_checked += 1
    return n_checked


def test_smollm2_rtn_reproduces_gguf_q4_1(smollm_gguf):
    """SmolLM2 as shipped is min-max 4-bit/group-32: RTN of its dequantized weights gives back the
    file's own codes, scales (d) and biases (m), bit for bit, and the same weights. (Each llama.cpp
    group holds codes 0 and 15, so min = m and max - min = 15*d exactly in float32; then
    (max - min) / 15 = d and the codes come back exactly.) First and last block here; all in the slow test."""
    assert _check_gguf_q4_1_round_trip(smollm_gguf, blocks={"0", "29"}) == 2 * 7


@pytest.mark.slow
def test_smollm2_rtn_reproduces_gguf_q4_1_all(smollm_gguf):
    assert _check_gguf_q4_1_round_trip(smollm_gguf) >= 7 * 30


@pytest.mark.slow
def test_smollm2_keep_quantized_equals_rtn_of_dequantized(smollm_gguf):
    from model import Transformer
    fq = Transformer.from_pretrained(smollm_gguf)
    kq = Transformer.from_pretrained(smollm_gguf, keep_quantized=True)
    quant.quantize_model(fq, 4, 32, method="rtn")
    for (n1, m1), (n2, m2) in zip(fq.named_modules(), kq.named_modules()):
        if isinstance(m2, quant.QuantLinear):
            assert torch.equal(m1.qweight, m2.qweight), n1
            assert torch.equal(m1.scales, m2.scales) and torch.equal(m1.biases, m2.biases), n1


def test_gptq_replay_of_finished_submodules_changes_nothing(tiny_args, monkeypatch):
    """_block_pass replays finished submodules instead of recomputing them: same codes as without."""
    calib = torch.randint(0, 128, (6, 32))
    fast = _tiny_model(tiny_args, hidden_dim=100)
    quant.quantize_model(fast, 3, 32, method="gptq", calib=calib, batch_size=4, progress=False)
    block_pass = quant._block_pass
    monkeypatch.setattr(quant, "_block_pass", lambda block, inputs, done, cache, pre_hook=None:
                        block_pass(block, inputs, done, {}, pre_hook))
    slow = _tiny_model(tiny_args, hidden_dim=100)
    quant.quantize_model(slow, 3, 32, method="gptq", calib=calib, batch_size=4, progress=False)
    for (n1, m1), (n2, m2) in zip(fast.named_modules(), slow.named_modules()):
        if isinstance(m1, quant.QuantLinear):
            assert torch.equal(m1.qweight, m2.qweight) and torch.equal(m1.scales, m2.scales), n1
            assert torch.equal(m1.biases, m2.biases), n1


def test_cli_rtn_and_gptq(tiny_model_dir, tiny_data, tmp_path, capsys):
    """quantize.py's main writes a checkpoint that loads back as the same quantized model (on conftest's tiny
    model directory, calibrated on its plain-text file)."""
    from model import Transformer, UserError
    out = tmp_path / "rtn"
    quantize.main(["--model", str(tiny_model_dir), "--bits", "3", "--group-size", "32", "--quant", "rtn", "--out", str(out)])
    back = Transformer.from_pretrained(out)
    ref = quant.quantize_model(Transformer.from_pretrained(tiny_model_dir), 3, 32)
    assert back.quantization == {"bits": 3, "group_size": 32, "method": "rtn", "format": "affine"}
    for (n1, m1), (n2, m2) in zip(ref.named_modules(), back.named_modules()):
        if isinstance(m1, quant.QuantLinear):
            assert torch.equal(m1.qweight, m2.qweight) and torch.equal(m1.scales, m2.scales), n1
    assert (out / "tokenizer.model").is_file()
    calib = tiny_data / "calib.txt"
    quantize.main(["--model", str(tiny_model_dir), "--bits", "4", "--group-size", "32", "--quant", "gptq", "--calib",
                str(calib), "--nsamples", "4", "--seq-len", "64", "--out", str(tmp_path / "gptq")])
    assert Transformer.from_pretrained(tmp_path / "gptq").quantization["method"] == "gptq"
    with pytest.raises(UserError, match="--calib"):
        quantize.main(["--model", str(tiny_model_dir), "--quant", "gptq", "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="--overwrite"):
        quantize.main(["--model", str(tiny_model_dir), "--quant", "rtn", "--out", str(out)])


def test_gptq_keeps_weights_already_on_the_grid():
    """Weights that already lie on a min-max grid (like SmolLM2's Q4_1 file at 4 bits / group 32) make
    every rounding error zero, so GPTQ never updates a column and returns the same codes as RTN."""
    out, n = 16, 96
    q = torch.randint(0, 16, (out, n), dtype=torch.uint8)
    q[:, 0::32], q[:, 1::32] = 0, 15  # every group spans the full range, as llama.cpp's quantizer ensures
    d = (torch.rand(out, 3) * 0.01 + 1e-3).half().float()  # fp16 scales and mins, as stored in the file
    m = (-8 * d - torch.rand(out, 3) * 1e-3).half().float()
    w = quant.dequantize(q, d, m, 32)
    qg, s, b = quant.gptq(w, correlated_hessian(n), 4, 32)
    assert torch.equal(qg, q) and torch.equal(s, d) and torch.equal(b, m)
