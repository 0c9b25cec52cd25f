"""kernels.py: every impl equals the reference (the definition: unpack, dequantize, matmul), values and
input gradients, across bits, group sizes (short last groups, -1), odd row counts and 3-D inputs."""
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

import kernels
import quant

BITS = (2, 3, 4, 5, 6, 8)
# (out, in, group_size): aligned; short last group (576 = 4*128 + 64, SmolLM2's width); whole rows;
# a group width that does not fill whole bytes (6 codes at 4 bits per byte... 6 % 4 != 0 at 2 bits)
SHAPES = [(48, 96, 32), (32, 72, 32), (32, 576, 128), (16, 64, -1), (24, 100, 6)]


def make_layer(out_f, in_f, group_size, bits, bias=True):
    w = torch.randn(out_f, in_f)
    q, s, b = quant.quantize(w, bits, group_size)
    return quant.QuantLinear.from_codes(q, s, b, bits, group_size, bias=torch.randn(out_f) if bias else None)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def value_and_grad(impl, x, layer):
    x = x.detach().clone().requires_grad_(True)
    y = kernels.qmatmul(x, layer, impl=impl)
    w = torch.linspace(-1, 1, y.numel()).view_as(y)  # a non-uniform upstream gradient
    (gx,) = torch.autograd.grad((y * w.to(y.dtype)).sum(), x)
    return y.detach(), gx


# -----------------------------------------------------------------------------
# pooling

def naive_pool(x, group_size):
    in_f = x.shape[-1]
    gs = in_f if group_size == -1 else min(group_size, in_f)
    cols = []
    for start in range(0, in_f, gs):
        cols.append(x[..., start:start + gs].sum(-1) / x[..., start:start + gs].shape[-1])
    return torch.stack(cols, dim=-1)


@pytest.mark.parametrize("in_f,gs", [(96, 32), (72, 32), (576, 128), (64, -1), (10, 32), (100, 6)])
def test_pool_groups_matches_naive_loop(in_f, gs):
    x = torch.randn(2, 3, in_f)
    got = kernels.pool_groups(x, gs)
    assert got.shape == (2, 3, len(quant.group_sizes(in_f, gs)))
    torch.testing.assert_close(got, naive_pool(x, gs))


def test_group_widths_match_quant():
    for in_f, gs in [(96, 32), (72, 32), (576, 128), (64, -1), (100, 6)]:
        assert kernels.group_widths(in_f, gs).tolist() == quant.group_sizes(in_f, gs)


# -----------------------------------------------------------------------------
# reference

def test_reference_is_dequantize_then_matmul():
    layer = make_layer(40, 72, 32, 3)
    x = torch.randn(2, 5, 72)
    w = quant.dequantize(quant.unpack(layer.qweight, 3, 72), layer.scales, layer.biases, 32)
    torch.testing.assert_close(kernels.qmatmul(x, layer, impl="reference"), x @ w.T + layer.bias)


def test_unknown_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown impl"):
        kernels.qmatmul(torch.randn(1, 96), make_layer(48, 96, 32, 4), impl="fast")


# -----------------------------------------------------------------------------
# the grouped formulation, run eagerly: the full grid (same code as "compiled", without compile time)

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_grouped_equals_reference(bits, shape):
    layer = make_layer(*shape, bits)
    for lead in [(1,), (3,), (7,), (2, 5)]:  # GEMV rows, dequant+BLAS rows, 3-D input
        x = torch.randn(*lead, shape[1])
        y_ref, g_ref = value_and_grad("reference", x, layer)
        y, g = value_and_grad("eager", x, layer)
        assert y.shape == (*lead, shape[0])
        with torch.no_grad():  # inference takes the fused small-M path
            y_ng = kernels.qmatmul(x, layer, impl="eager")
        assert rel(y_ng, y_ref) < 1e-5, (bits, shape, lead, rel(y_ng, y_ref))
        assert rel(y, y_ref) < 1e-5, (bits, shape, lead, rel(y, y_ref))
        assert rel(g, g_ref) < 1e-5, (bits, shape, lead, rel(g, g_ref))


def test_planes_layout_is_qweight_when_aligned():
    """2/4/8 bits with in % group == 0 read the packed buffer itself: no copy, nothing cached
    (unless a group's plane would be shorter than 16 codes: 2 bits at group 32 is kept in nibbles)."""
    for bits, gs in ((2, 64), (4, 32), (8, 32)):
        layer = make_layer(16, 128, gs, bits)
        assert kernels._planes(layer).data_ptr() == layer.qweight.data_ptr()
        assert not layer.kernel_cache
    layer = make_layer(16, 128, 32, 2)
    assert kernels._layout(layer)[:2] == (4, 2) and kernels._planes(layer).shape == (16, 4, 16)


def test_cache_follows_in_place_changes():
    """merge.py rewrites biases in place; a reload rewrites codes: results must follow both."""
    layer = make_layer(32, 72, 32, 3)  # 3 bits + short group: the planes layout is cached
    x = torch.randn(2, 72)
    kernels.qmatmul(x, layer, impl="eager")
    with torch.no_grad():
        layer.biases.add_(0.25)
        other = make_layer(32, 72, 32, 3)
        layer.qweight.copy_(other.qweight)
    torch.testing.assert_close(kernels.qmatmul(x, layer, impl="eager"), kernels.qmatmul(x, layer, impl="reference"),
                               rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# gemv: the C++ kernel (kernels_cpu.cpp), every bit width the bit layout packs, the vector and scalar paths

needs_gemv = pytest.mark.skipif(not kernels.gemv_available(), reason="the C++ gemv could not be built here")


@needs_gemv
@pytest.mark.parametrize("bits", (1, 2, 3, 4, 5, 6, 7, 8))
@pytest.mark.parametrize("shape", SHAPES + [(20, 4096, 32), (8, 37, 10), (8, 40, 16), (16, 192, 64), (8, 320, 96),
                                   (40, 256, 16), (16, 256, 8), (8, 320, 128)])
# (the lane rows' blocks of 2, 4 and 8 groups, and groups of whole blocks with a short last group)
def test_gemv_equals_reference(bits, shape):
    out_f, in_f, gs = shape
    q = torch.randint(0, 2 ** bits, (out_f, in_f), dtype=torch.uint8)
    ng = len(quant.group_sizes(in_f, gs))
    # kernels take any object with QuantLinear's attributes (QuantLinear itself checks bits against quant.BITS)
    layer = types.SimpleNamespace(qweight=quant.pack(q, bits), scales=torch.randn(out_f, ng),
                                  biases=torch.randn(out_f, ng), bias=torch.randn(out_f), bits=bits,
                                  group_size=quant.effective_group_size(in_f, gs), in_features=in_f,
                                  out_features=out_f, n_groups=ng, kernel_cache={})
    for lead in [(1,), (2,), (3,), (5,), (8,), (2, 4)]:  # row counts (up to 4 a pass, then the rest), 3-D
        x = torch.randn(*lead, in_f)
        y_ref, g_ref = value_and_grad("reference", x, layer)
        y, g = value_and_grad("gemv", x, layer)
        assert rel(y, y_ref) < 1e-5, (bits, shape, lead, rel(y, y_ref))
        assert rel(g, g_ref) < 1e-5, (bits, shape, lead, rel(g, g_ref))


@needs_gemv
def test_gemv_takes_bf16_inputs_and_refuses_many_rows():
    layer = make_layer(48, 96, 32, 4)
    x = torch.randn(2, 96)
    y = kernels.qmatmul(x.bfloat16(), layer, impl="gemv")
    assert y.dtype == torch.bfloat16
    assert rel(y, kernels.qmatmul(x.bfloat16().float(), layer, impl="reference")) < 1e-2
    with pytest.raises(ValueError, match="at most"):
        kernels.qmatmul(torch.randn(kernels.GEMV_MAX_M + 1, 96), layer, impl="gemv")


@needs_gemv
@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("shape", [(40, 256, 32), (16, 512, 128), (24, 576, 64), (8, 256, 16), (8, 256, 8),
                                   (8, 640, 256)])
def test_gemv_bf16_fixed_point_rows(bits, shape):
    """bf16 inputs of 2/4/8-bit layers go through the 16-bit fixed-point rows: every bf16 value within 2^-7 of its
    block's largest is exact, smaller ones are rounded to 2^-15 of the largest. Checked against float64 on x as
    given, and on a block with a wide range (a spike beside values down to 2^-30) against the stated bound."""
    out_f, in_f, gs = shape
    q = torch.randint(0, 2 ** bits, (out_f, in_f), dtype=torch.uint8)
    ng = len(quant.group_sizes(in_f, gs))
    s, b = torch.rand(out_f, ng) + 0.1, torch.randn(out_f, ng)
    w = kernels.dequantize(q, s, b, gs).double()
    B = 256 // bits  # columns per block of the fixed-point rows
    for M in (1, 3, 6):
        x = torch.randn(M, in_f).bfloat16()
        y = kernels.gemv_codes(x, quant.pack(q, bits), s, b, bits, gs)
        y_ref = x.double() @ w.T
        assert rel(y, y_ref) < 2e-5, (bits, shape, M, rel(y, y_ref))
    x = torch.randn(1, in_f) * 2.0 ** -torch.randint(0, 31, (1, in_f))  # magnitudes from 1 down to 2^-30
    x[0, ::B] = 4.0  # each block's largest
    x = x.bfloat16()
    y = kernels.gemv_codes(x, quant.pack(q, bits), s, b, bits, gs).double()
    xd = x.double()
    # the bound: per element 2^-15 of its block's largest (4.0 -> 2^-13) times |w| where rounding applies
    bound = (2.0 ** -13 * w.abs().sum(1)).max().item() + 1e-5 * (xd @ w.T).abs().max().item()
    assert (y - xd @ w.T).abs().max().item() <= bound


@needs_gemv
@pytest.mark.parametrize("e", (2, 4, 8))
@pytest.mark.parametrize("Gc", (16, 24, 50, 6))  # whole vectors, and scalar tails
def test_cpp_dequant_equals_torch_graph(e, Gc):
    """kernels_cpu.cpp's dequant writes exactly the planes-order w~ that the torch expression defines."""
    N, ng = 5, 3
    P = torch.randint(0, 256, (N, ng, Gc), dtype=torch.uint8)
    s, b = torch.randn(N, ng), torch.randn(N, ng)
    want = kernels._dequant_w(P, s, b, e, 8 // e)
    torch.testing.assert_close(torch.ops.qalora.dequant(P, s, b, e), want, rtol=1e-6, atol=1e-6)


@needs_gemv
def test_gemv_runs_inside_a_compiled_graph():
    """The op is opaque to torch.compile (a fake impl gives its shape): the compiled decode step calls it."""
    layer = make_layer(48, 96, 32, 4)
    x = torch.randn(1, 96)
    f = torch.compile(lambda x: torch.relu(kernels.qmatmul(x, layer, impl="gemv")) * 2, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(f(x), torch.relu(kernels.qmatmul(x, layer, impl="reference")) * 2,
                                   rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# compiled: a few shapes by default (each new shape compiles), the full grid under -m slow

COMPILED_CASES = [(4, (48, 96, 32)), (3, (32, 72, 32))]


def _check_impl(impl, bits, shape, leads=((1,), (5,), (2, 3))):
    layer = make_layer(*shape, bits)
    for lead in leads:
        x = torch.randn(*lead, shape[1])
        y_ref, g_ref = value_and_grad("reference", x, layer)
        y, g = value_and_grad(impl, x, layer)
        with torch.no_grad():
            y_ng = kernels.qmatmul(x, layer, impl=impl)
        assert rel(y, y_ref) < 1e-4, (impl, bits, shape, lead, rel(y, y_ref))
        assert rel(y_ng, y_ref) < 1e-4, (impl, bits, shape, lead, rel(y_ng, y_ref))
        assert rel(g, g_ref) < 1e-4, (impl, bits, shape, lead, rel(g, g_ref))


@pytest.mark.parametrize("bits,shape", COMPILED_CASES)
def test_compiled_equals_reference(bits, shape):
    _check_impl("compiled", bits, shape)


@pytest.mark.slow
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_compiled_equals_reference_full_grid(bits, shape):
    _check_impl("compiled", bits, shape, leads=((1,), (3,), (7,), (2, 5)))


def test_compile_failure_degrades_to_eager_with_one_warning(monkeypatch):
    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("no C++ compiler")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(kernels, "gemv_available", lambda: False)  # the CPU's C++ dequant would not compile
    monkeypatch.setattr(kernels, "_compiled_fns", {})
    monkeypatch.setattr(kernels, "_compile_failed", False)
    layer = make_layer(48, 96, 32, 4)
    x = torch.randn(2, 96)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        y = kernels.qmatmul(x, layer, impl="compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        kernels.qmatmul(x, layer, impl="compiled")
    torch.testing.assert_close(y, kernels.qmatmul(x, layer, impl="reference"), rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# native int4 (bf16 compute)

def test_native_scale_zero_conversion():
    """Their dequant is (q - 8) * scale + zero; ours scales * q + biases: zero = biases + 8 * scales."""
    layer = make_layer(32, 64, 32, 4)
    sz = kernels._native_scales_zeros(layer).float()  # [ng, out, 2]
    q = quant.unpack(layer.qweight, 4, 64).float().view(32, 2, 32)
    theirs = (q - 8) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
    ours = layer.scales[..., None] * q + layer.biases[..., None]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0.02)  # bf16 rounding of scale and zero only


@pytest.mark.parametrize("shape", [(48, 96, 32), (32, 256, 64), (16, 256, 128), (16, 512, 256), (32, 64, -1)])
def test_native_within_stated_tolerance(shape):
    layer = make_layer(*shape, 4)
    assert kernels.native_supported(layer)
    for lead in [(1,), (5,), (2, 3)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(*lead, shape[1]).to(dtype)
            y_ref, g_ref = value_and_grad("reference", x.float(), layer)
            y, g = value_and_grad("native", x, layer)
            assert y.dtype == dtype
            assert rel(y, y_ref) < kernels.NATIVE_RTOL, (shape, lead, dtype, rel(y, y_ref))
            assert rel(g, g_ref) < (1e-5 if dtype == torch.float32 else kernels.NATIVE_RTOL)


def test_native_cache_follows_bias_change():
    layer = make_layer(32, 64, 32, 4)
    x = torch.randn(3, 64)
    kernels.qmatmul(x, layer, impl="native")
    with torch.no_grad():
        layer.biases.add_(1.0)
    assert rel(kernels.qmatmul(x, layer, impl="native"), kernels.qmatmul(x, layer, impl="reference")) < 1e-2


def test_native_rejects_unsupported_layers():
    for layer in [make_layer(32, 72, 32, 4), make_layer(32, 96, 32, 3), make_layer(24, 64, 32, 4)]:
        assert not kernels.native_supported(layer)
        with pytest.raises(ValueError, match="impl=.native. needs"):
            kernels.qmatmul(torch.randn(1, layer.in_features), layer, impl="native")


# -----------------------------------------------------------------------------
# auto

def test_auto_choices():
    small, big = make_layer(32, 64, 32, 4), make_layer(256, 256, 32, 4)
    few = "gemv" if kernels.gemv_available() else None
    bf16 = "native" if kernels.cpu_has_bf16() else "eager"  # without bf16 hardware the float32 path is faster
    M = kernels.GEMV_MAX_M
    assert kernels.choose_impl(torch.randn(1, 256), big) == (few or "compiled")
    assert kernels.choose_impl(torch.randn(M, 64, dtype=torch.bfloat16), small) == (few or bf16)
    assert kernels.choose_impl(torch.randn(M + 1, 64), small) == "eager"  # tiny: compiling does not pay
    assert kernels.choose_impl(torch.randn(M + 1, 256), big) == "compiled"  # fp32 stays fp32-accurate
    assert kernels.choose_impl(torch.randn(M + 1, 64, dtype=torch.bfloat16), small) == bf16
    odd = make_layer(24, 72, 32, 4)
    assert kernels.choose_impl(torch.randn(M + 1, 72, dtype=torch.bfloat16), odd) == "eager"


def test_quantlinear_forward_uses_qmatmul():
    layer = make_layer(32, 72, 32, 4)
    x = torch.randn(2, 3, 72)
    torch.testing.assert_close(layer(x), kernels.qmatmul(x, layer, impl="reference"), rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# triton, under the interpreter on CPU tensors (a separate process: TRITON_INTERPRET is read at import)

def test_triton_interpreted_equals_reference():
    pytest.importorskip("triton", reason="triton is not installed (optional: pip install triton)")
    code = (
        "import torch, kernels, sys; sys.path.insert(0, 'tests'); from test_kernels import make_layer, rel\n"
        "torch.manual_seed(0)\n"
        "for bits, shape in [(4, (32, 64, 32)), (2, (16, 64, 32)), (8, (16, 64, 32)), (4, (16, 72, 32)), (3, (16, 64, 32)),\n"
        "                   (3, (24, 100, 6)), (4, (16, 64, -1)), (4, (100, 64, 32))]:\n"
        "    layer = make_layer(*shape, bits)\n"
        "    for m in (1, 3, 40, 130):  # one and several row tiles (16 to 64 rows), partial tiles\n"
        "        x = torch.randn(m, shape[1])\n"
        "        e = rel(kernels.qmatmul(x, layer, impl='triton'), kernels.qmatmul(x, layer, impl='reference'))\n"
        "        assert e < 1e-4, (bits, shape, m, e)\n"
        # the half-precision branch (tl.dot in fp16, fp32 accumulation): the input and the dequantized tile are
        # rounded to fp16 (~5e-4 each). bf16 takes the same branch but cannot be checked here: the interpreter's
        # tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584, unsupported upstream)
        "layer = make_layer(100, 64, 32, 4)\n"
        "for m in (1, 40):\n"
        "    x = torch.randn(m, 64).half()\n"
        "    y = kernels.qmatmul(x, layer, impl='triton')\n"
        "    e = rel(y, kernels.qmatmul(x.float(), layer, impl='reference'))\n"
        "    assert y.dtype == torch.float16 and e < 2e-3, ('fp16', m, e)\n"
        "x = torch.randn(2, 3, 64, requires_grad=True)\n"
        "layer = make_layer(16, 64, 32, 4)\n"
        "(gt,) = torch.autograd.grad(kernels.qmatmul(x, layer, impl='triton').pow(2).sum(), x)\n"
        "(gr,) = torch.autograd.grad(kernels.qmatmul(x, layer, impl='reference').pow(2).sum(), x)\n"
        "assert rel(gt, gr) < 1e-4, rel(gt, gr)\n"
        "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
