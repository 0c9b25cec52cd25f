"""
Dequant-matmul kernels: y = x @ w~^T (+ bias) for a quant.QuantLinear, where

    w~[o, i] = scales[o, g] * q[o, i] + biases[o, g]        g = the group of column i

One dispatch function, `qmatmul(x, layer, impl)`, with explicit choices:

- "reference": unpack, dequantize, matmul in float32. The readable definition; every other path is
  tested against it (tests/test_kernels.py).
- "compiled": the grouped formulation, compiled with torch.compile (TorchInductor's C++ backend on CPU):

      y = sum_g scales_g * (x_g @ q_g^T)  +  sum_g biases_g * sum(x_g)

  The second term needs only the per-group input sums, i.e. pool_groups(x) * group width: the same
  pool QA-LoRA's adapter reads, so the adapter computes it once and passes it in (`pooled=`), and its
  gradient flows back through that pool. For M <= GEMV_MAX_M rows the first term is one fused
  reduction over the packed codes (decode; without autograd the whole layer, bias term included, is
  one graph); for more rows it dequantizes `scales * q` a chunk of rows at a time and calls the BLAS
  matmul (prefill, training). Without autograd, a layer small enough to dequantize at once
  (out x in <= CHUNK_NUMEL: all of SmolLM2's) is one graph for any M too, to cut the per-call
  overhead that dominates such layers at M=16. All float32: equal to reference to ~1e-6 relative. The biases and
  scales are read fresh every call (merge.py rewrites the biases); only a code layout is cached.
  If compiling fails (no C++ compiler, an inductor bug) it warns once and runs the same code eagerly.
- "eager": the same grouped code without torch.compile (what auto uses for tiny layers).
- "native": PyTorch's int4 kernels (torch.ops.aten._weight_int4pack_mm_for_cpu on CPU,
  _weight_int4pack_mm on CUDA); 4 bits, group 32/64/128/256 dividing in_features, out_features % 16 == 0.
  They compute in bfloat16 (x is cast around the call; y comes back in x's dtype), with scale and zero
  rounded to bf16: ||y - ref|| / ||ref|| <= NATIVE_RTOL = 1e-2 (measured 2.5e-3 to 4e-3). The backward
  is the fp32 grouped formulation.
- "triton": a Triton dequant-matmul for CUDA (optional, guarded import), tested on CPU tensors under
  TRITON_INTERPRET=1; see the notes above the kernel for what to expect of it on a GPU.
- "auto" (QuantLinear's default; `choose_impl` says what it picks):
    x bfloat16 and the layer fits native   -> native  (the caller chose bf16 precision: fastest on CPU)
    CUDA and triton importable             -> triton
    out * in >= COMPILE_MIN_NUMEL          -> compiled (fp32-accurate: training, merge exactness checks)
    otherwise                              -> eager   (tiny layers: compiling would not pay back)
  fp32 activations never go through bf16 behind the caller's back: the QA-LoRA merge is exact only
  if both sides of the comparison are computed in fp32.

Autograd works through every path: the base is frozen, so only the input gradient is needed,
grad_x = grad_y @ w~, computed with the transposed grouped formulation (grad_y @ (scales*q) chunk by
chunk, plus grad_y @ biases spread over each group).

For a model-wide compiled graph (generate.py's compiled decode steps), `freeze(model, dtype)` stores each
layer's choice and derived tensors on the layer, so tracing never touches the caches (see "frozen plans").

Set QALORA_COMPILE=0 to run the grouped code eagerly everywhere (e.g. on a machine without a compiler).
"""
import os
import warnings

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # optional accelerator
    triton = None

IMPLS = ("reference", "compiled", "native", "triton", "auto")
GEMV_MAX_M = 8  # up to this many rows the fused reduction beats dequantize + BLAS (4096x4096, 1 thread: 18 vs 35 ms at M=8)
COMPILE_MIN_NUMEL = 1 << 16  # auto compiles layers with out*in >= this; tiny ones run eagerly
NATIVE_RTOL = 1e-2  # stated tolerance of the bf16 native path (measured ~2.5e-3, normwise)
NATIVE_GROUPS = (32, 64, 128, 256)
COMPILE = os.environ.get("QALORA_COMPILE", "1") != "0"  # QALORA_COMPILE=0 runs the grouped code eagerly


# -----------------------------------------------------------------------------
# pooling: one implementation for the kernels' bias term and QA-LoRA's adapter input

def pool_groups(x, group_size):
    """Group means along the last dim: [..., in] -> [..., n_groups]. Groups are consecutive runs of
    `group_size` columns (-1: the whole row); a short last group averages over its own width."""
    in_features = x.shape[-1]
    gs = in_features if group_size == -1 else min(group_size, in_features)
    n_full, rest = divmod(in_features, gs)
    lead = x.shape[:-1]
    pooled = x[..., :n_full * gs].reshape(*lead, n_full, gs).mean(dim=-1)  # [..., n_full]
    if rest:  # the short last group: its own mean
        pooled = torch.cat([pooled, x[..., n_full * gs:].mean(dim=-1, keepdim=True)], dim=-1)  # [..., n_groups]
    return pooled


def group_widths(in_features, group_size, device=None, dtype=torch.float32):
    """Width of each group as a tensor [n_groups]: [gs, ..., gs, rest]."""
    gs = in_features if group_size == -1 else min(group_size, in_features)
    n_full, rest = divmod(in_features, gs)
    return torch.tensor([gs] * n_full + ([rest] if rest else []), device=device, dtype=dtype)


# -----------------------------------------------------------------------------
# reference: the definition

def dequantize(layer, dtype=torch.float32):
    """w~ [out, in] of a QuantLinear, via quant.unpack and quant.dequantize."""
    import quant  # lazy: quant.py imports this file for QuantLinear.forward
    q = quant.unpack(layer.qweight, layer.bits, layer.in_features)  # [out, in] uint8
    return quant.dequantize(q, layer.scales, layer.biases, layer.group_size).to(dtype)  # [out, in]


def reference(x, layer):
    """y = x @ w~^T (+ bias), computed in float32 and returned in x's dtype. Autograd flows through
    the plain matmul (w~ is a constant)."""
    w = dequantize(layer)  # [out, in] f32
    y = x.float() @ w.T  # [..., out]
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype)


# -----------------------------------------------------------------------------
# per-layer caches
#
# Derived tensors (a code layout, the native kernel's packed weight) are cached in a plain dict on the
# layer, keyed by the identity and in-place version counter of the tensors they derive from, so that
# copy_/load_state_dict/.to() invalidate them. Biases and scales are read fresh every call by the
# compiled path (merge.py rewrites the biases); the native path's scale-and-zero tensor is keyed on both.

def _key(*tensors):
    return tuple((t.data_ptr(), t._version, t.device, t.dtype, tuple(t.shape)) for t in tensors)


def _cached(layer, name, deps, build):
    cache = layer.__dict__.setdefault("_kernel_cache", {})
    key = _key(*deps)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = (key, build())
        cache[name] = hit
    return hit[1]


# -----------------------------------------------------------------------------
# compiled: the grouped formulation
#
# Code layout ("planes"): per row, the codes padded to n_groups * G (G = group_size; a short last group
# is padded with code 0, whose scales*q term is 0) are packed with e = 2, 4 or 8 bits per code, LSB
# first: c = 8 // e codes per byte, byte k of a row holds codes c*k + t at bits [t*e, (t+1)*e).
# That is exactly quant.pack's layout, so for 2, 4 and 8 bits with in % G == 0 the layout IS
# layer.qweight (no copy); 3-bit codes are stored in nibbles (e = 4), unaligned widths are padded,
# and codes are widened when a group's plane would be shorter than 16 (2 bits at group 32: nibbles).
# Viewed as [out, n_groups, G/c] bytes, code t of byte j pairs with input column g*G + c*j + t, so the
# input is permuted once per call to [M, n_groups, c, G/c] ("x planes") and every plane t is a
# contiguous, vectorizable stream.

def _layout(layer):
    """(e, c, G, padded width) of the planes layout for this layer."""
    G = layer.group_size
    e = 4 if layer.bits == 3 else layer.bits
    # each plane of a group must fill whole bytes and be >= 16 codes long (one AVX-512 vector of f32;
    # shorter inner loops do not vectorize: 2 bits at group 32 ran 5x slower): else widen the codes
    while e < 8 and (G % (8 // e) or G // (8 // e) < 16):
        e *= 2
    return e, 8 // e, G, layer.n_groups * G


def _planes(layer):
    """Codes in the planes layout: uint8 [out, n_groups, G/c]."""
    e, c, G, Kp = _layout(layer)
    N, K = layer.out_features, layer.in_features
    if e == layer.bits and K == Kp:  # already laid out this way: a view of the buffer, nothing cached
        return layer.qweight.view(N, layer.n_groups, G // c)

    def build():
        import quant
        return quant.pack(_padded_codes(layer), e).view(N, layer.n_groups, G // c)

    return _cached(layer, "planes", (layer.qweight,), build)


def _padded_codes(layer):
    """The codes as uint8 [out, n_groups * G], code 0 in the padding of a short last group."""
    import quant
    _, _, _, Kp = _layout(layer)
    return F.pad(quant.unpack(layer.qweight, layer.bits, layer.in_features), (0, Kp - layer.in_features))


def _x_planes(x2, c, G, Kp, copy=True):
    """[M, K] -> [M, n_groups, c, G/c]: column g*G + c*j + t goes to [g, t, j] (copy=False: a strided view)."""
    M, K = x2.shape
    if Kp != K:
        x2 = F.pad(x2, (0, Kp - K))
    xp = x2.view(M, Kp // G, G // c, c).transpose(2, 3)
    return xp.contiguous() if copy else xp


def _gemv(xp, P, scales, e: int, c: int):
    """sum_g scales_g * (x_g @ q_g^T) for few rows. xp [M, ng, c, G/c] f32, P [N, ng, G/c] uint8,
    scales [N, ng] -> [M, N]. Loop order n-outer, m-inner so each row of codes is read once."""
    mask = (1 << e) - 1
    P = P.to(torch.int32)  # widen once: shifts and masks on 32-bit lanes vectorize (~2x faster than on bytes)
    acc = None
    for t in range(c):
        q_t = ((P >> (t * e)) & mask).to(torch.float32).unsqueeze(1)  # [N, 1, ng, G/c]
        term = xp[:, :, t, :].unsqueeze(0) * q_t  # [N, M, ng, G/c]
        acc = term if acc is None else acc + term
    return (acc * scales[:, None, :, None]).sum(dim=(2, 3)).T  # [M, N]


def _dequant_sq(P, scales, e: int, c: int):
    """scales * q in planes column order: [N, ng, G/c] codes -> [N, ng*G] f32, column g*G + t*(G/c) + j
    holding code c*j + t of group g (the order of _x_planes, so x_planes @ this^T is x @ (scales*q)^T).
    Column k reads byte k % (G/c) at shift (k // (G/c)) * e: written as an index expression (repeat and
    arange), inductor makes it one vectorized pass from bytes to f32; torch.cat of the planes first wrote every
    plane out as int32 (the M=16 graph of a 576x192 layer, 1 thread: 105 -> 87 us)."""
    N, ng, Gc = P.shape
    shifts = torch.arange(c * Gc, device=P.device, dtype=torch.int32) // Gc * e  # [G]
    q = (P.repeat(1, 1, c).to(torch.int32) >> shifts) & ((1 << e) - 1)  # [N, ng, G]
    return (q.to(torch.float32) * scales[:, :, None]).reshape(N, ng * Gc * c)  # [N, Kp]


_compiled_fns = {}
_compile_failed = False


def _maybe_compiled(fn, compiled):
    """torch.compile(fn), or fn itself when compiling is off or has failed once (one warning)."""
    if not compiled or not COMPILE or _compile_failed:
        return fn
    if fn not in _compiled_fns:
        _compiled_fns[fn] = compile_fn(fn, dynamic=False)
    return _compiled_fns[fn]


def compile_fn(fn, dynamic):
    """torch.compile(fn) allowing one graph per shape: static shapes vectorize best, and a model has a
    handful of layer shapes (generate.py compiles its decode block with this too)."""
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(fn, dynamic=dynamic)


def _run(fn, compiled, *args):
    """Call the compiled fn; if compilation fails, warn once and run eagerly from then on."""
    global _compile_failed
    f = _maybe_compiled(fn, compiled)
    if f is fn:
        return fn(*args)
    try:
        return f(*args)
    except Exception as err:  # a missing/broken C++ toolchain, an inductor bug: degrade, do not die
        _compile_failed = True
        warnings.warn(f"kernels: torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                      f"running the grouped kernels eagerly")
        return fn(*args)


CHUNK_NUMEL = 1 << 20  # dequantize this many weights at a time (4 MB of f32: stays in L2/L3, no page faults)


def _row_chunk(N, K):
    """Rows per dequantized chunk: about CHUNK_NUMEL weights, preferably dividing N (one compiled shape)."""
    target = max(1, min(N, CHUNK_NUMEL // K))
    for nb in range(target, max(1, target // 4) - 1, -1):
        if N % nb == 0:
            return nb
    return target


def _sq_chunks(layer, compiled):
    """Yield (row slice, scales * q as f32 [rows, Kp] in planes column order), a chunk of rows at a time."""
    e, c, G, Kp = _layout(layer)
    P, scales = _planes(layer), layer.scales.float()
    N = layer.out_features
    nb = _row_chunk(N, Kp)
    for i in range(0, N, nb):
        yield slice(i, i + nb), _run(_dequant_sq, compiled, P[i:i + nb], scales[i:i + nb], e, c)  # [nb, Kp]


def _sq_matmul(xp, layer, compiled):
    """xp [M, Kp] (planes order) @ (scales * q)^T -> [M, out], dequantizing a chunk of rows at a time."""
    return torch.cat([xp @ w.T for _, w in _sq_chunks(layer, compiled)], dim=1)  # [M, out]


def _sq_matmul_t(gy, layer, compiled):
    """gy [M, out] @ (scales * q) -> [M, in] in natural column order, accumulated chunk by chunk."""
    e, c, G, Kp = _layout(layer)
    M = gy.shape[0]
    gxp = gy.new_zeros(M, Kp)  # planes order
    for rows, w in _sq_chunks(layer, compiled):
        gxp.addmm_(gy[:, rows], w)
    gx = gxp.view(M, Kp // G, c, G // c).transpose(2, 3).reshape(M, Kp)  # back to natural order
    return gx[:, :layer.in_features]


def _grad_input(gy, layer, compiled):
    """grad_x = grad_y @ w~ = grad_y @ (scales*q) + (grad_y @ biases) spread over each group."""
    gx = _sq_matmul_t(gy, layer, compiled)  # [M, in]
    gb = gy @ layer.biases.float()  # [M, n_groups]
    widths = group_widths(layer.in_features, layer.group_size, device=gy.device, dtype=torch.long)
    return gx + gb.repeat_interleave(widths, dim=1)


class _GroupedScaleMatmul(torch.autograd.Function):
    """x2 [M, in] f32 -> x2 @ (scales * q)^T [M, out]; backward: grad @ (scales * q)."""

    @staticmethod
    def forward(ctx, x2, layer, compiled):
        ctx.layer, ctx.compiled = layer, compiled
        e, c, G, Kp = _layout(layer)
        xp = _x_planes(x2, c, G, Kp)  # [M, ng, c, G/c]
        if x2.shape[0] <= GEMV_MAX_M:  # few rows: one fused pass over the packed codes
            if xp.shape[0] > 1:
                torch._dynamo.mark_dynamic(xp, 0)
            return _run(_gemv, compiled, xp, _planes(layer), layer.scales.float(), e, c)
        return _sq_matmul(xp.view(x2.shape[0], Kp), layer, compiled)  # [M, out]

    @staticmethod
    def backward(ctx, gy):
        return _sq_matmul_t(gy.contiguous(), ctx.layer, ctx.compiled), None, None


def _decode_step(xp, P, scales, biases, bias, e: int, c: int):
    """The whole small-M forward as one graph (no autograd): y = gemv + group sums @ biases^T (+ bias).
    The group sums come from the padded input planes (padding is zero), so short groups need nothing.
    The bias term is written as a multiply-and-sum, not `sums @ biases.T`: inductor then streams the biases
    in a vectorized reduction instead of calling the matmul (4096x4096, 4 bits, M=1, 1 thread: 1.38 -> 1.22 ms)."""
    y = _gemv(xp, P, scales, e, c) + (xp.sum(dim=(2, 3))[:, None, :] * biases).sum(-1)  # [M, out]
    return y + bias if bias is not None else y


def _dequant_step(xp, P, scales, biases, bias, e: int, c: int):
    """The whole forward for more rows, no autograd, the layer dequantized at once (small layers): one graph
    around one BLAS call, y = x_planes @ (scales * q + biases)^T (+ bias). The biases are folded into the
    dequantized matrix (one more multiply-add per weight) instead of a second matmul with the group sums;
    padding columns get biases too, but their inputs are zero. xp may be a strided view (the transpose is
    then a copy inside the graph: ~6 us for a 16 x 576 input, ~12 us as an eager call)."""
    N, ng, Gc = P.shape
    w = _dequant_sq(P, scales, e, c).view(N, ng, c * Gc) + biases[:, :, None]  # [N, ng, G]
    y = xp.reshape(xp.shape[0], ng * c * Gc) @ w.view(N, ng * c * Gc).T  # [M, out]
    return y + bias if bias is not None else y


def _whole_layer(xp, P, layer, compiled):
    """The layer's forward without autograd as one call: the fused GEMV for up to GEMV_MAX_M rows, else
    dequantize-then-BLAS. xp [M, ng, c, G/c] pairs plane t with plane t of the codes P."""
    e, c, _, _ = _layout(layer)
    step = _decode_step if xp.shape[0] <= GEMV_MAX_M else _dequant_step
    bias = layer.bias.float() if layer.bias is not None else None
    return _run(step, compiled, xp, P, layer.scales.float(), layer.biases.float(), bias, e, c)  # [M, out]


def grouped(x, layer, pooled=None, compiled=True):
    """The grouped formulation (the "compiled" impl; compiled=False runs the same code eagerly)."""
    K = layer.in_features
    x2 = x.reshape(-1, K).float()  # [M, in]
    M = x2.shape[0]
    e, c, G, Kp = _layout(layer)
    one_chunk = layer.out_features * Kp <= CHUNK_NUMEL
    if (M <= GEMV_MAX_M or one_chunk) and not (torch.is_grad_enabled() and x2.requires_grad):
        # no autograd and few rows (decode) or a small layer: the whole layer is one compiled call, which
        # keeps the per-call overhead small (the bias term is computed in the graph)
        # the GEMV's input planes are built outside the graph: fused into the GEMV reduction, their strided
        # loads become a scalar gather repeated for every output row (4096x4096, 4 bits, 1 thread: 1.64 -> 1.38 ms)
        xp = _x_planes(x2, c, G, Kp, copy=M <= GEMV_MAX_M)  # [M, ng, c, G/c]
        if M > 1:  # one graph for every M in 2..GEMV_MAX_M and one for more (M = 1 gets its own, specialized)
            torch._dynamo.mark_dynamic(xp, 0)
        y = _whole_layer(xp, _planes(layer), layer, compiled)
        return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
    y = _GroupedScaleMatmul.apply(x2, layer, compiled)  # [M, out]: sum_g scales_g * x_g @ q_g^T
    if pooled is None:
        pooled = pool_groups(x2, layer.group_size)  # [M, ng]
    widths = _cached(layer, "widths", (layer.scales,),
                     lambda: group_widths(K, layer.group_size, device=x.device))  # [ng]
    sums = pooled.reshape(-1, layer.n_groups).float() * widths
    y = y + sums @ layer.biases.float().T  # + sum_g biases_g * sum(x_g)
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


# -----------------------------------------------------------------------------
# native: PyTorch's int4 kernels (tinygemm layout)
#
# Their dequantization is  w = (q - 8) * scale + zero  per (row, group), with q the 4-bit code.
# Ours is  w = scales * q + biases,  so  scale = scales  and  zero = biases + 8 * scales
# (checked in tests/test_kernels.py). scales_and_zeros is bf16 [n_groups, out, 2] (scale, zero).
# The weight is packed once by _convert_weight_to_int4pack(_for_cpu) and cached on the layer.

def native_supported(layer, device=None):
    device = device or layer.qweight.device
    return (layer.bits == 4 and layer.group_size in NATIVE_GROUPS and layer.in_features % layer.group_size == 0
            and layer.out_features % 16 == 0 and device.type in ("cpu", "cuda"))


def _native_weight(layer):
    def build():
        import quant
        q = quant.unpack(layer.qweight, 4, layer.in_features)  # [N, K] uint8
        if layer.qweight.device.type == "cuda":
            # CUDA packs two codes per byte, even column in the high nibble (torchao's convention), 8 k-tiles
            return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)  # [N, K/2]
    return _cached(layer, "native_w", (layer.qweight,), build)


def _native_scales_zeros(layer):
    def build():
        s, b = layer.scales.float(), layer.biases.float()
        return torch.stack([s, b + 8 * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [ng, N, 2]
    return _cached(layer, "native_sz", (layer.scales, layer.biases), build)


def _native_mm(x2, layer, w, sz):
    """x2 [M, in] -> y [M, out] (+ layer.bias) through the bf16 int4 kernel, in x2's dtype; w and sz are
    _native_weight(layer) and _native_scales_zeros(layer)."""
    op = torch.ops.aten._weight_int4pack_mm if x2.device.type == "cuda" else torch.ops.aten._weight_int4pack_mm_for_cpu
    y = op(x2.to(torch.bfloat16), w, layer.group_size, sz).to(x2.dtype)  # [M, out]
    return y + layer.bias.to(y.dtype) if layer.bias is not None else y


class _NativeMatmul(torch.autograd.Function):
    """x2 [M, in] -> bf16 int4 matmul [M, out] (+ layer.bias, a constant); backward in f32 via the grouped form."""

    @staticmethod
    def forward(ctx, x2, layer):
        ctx.layer = layer
        return _native_mm(x2, layer, _native_weight(layer), _native_scales_zeros(layer))

    @staticmethod
    def backward(ctx, gy):
        return _grad_input(gy.float(), ctx.layer, compiled=True).to(gy.dtype), None


def native(x, layer):
    assert native_supported(layer, x.device), (
        f"native int4 kernel needs bits=4, group_size in {NATIVE_GROUPS} dividing in_features and out_features % 16 "
        f"== 0; got bits={layer.bits}, group_size={layer.group_size}, in={layer.in_features}, out={layer.out_features}")
    x2 = x.reshape(-1, layer.in_features)
    if torch.is_grad_enabled() and x2.requires_grad:
        y = _NativeMatmul.apply(x2, layer)
    else:  # no autograd.Function: less overhead per call
        y = _native_mm(x2, layer, _native_weight(layer), _native_scales_zeros(layer))
    return y.reshape(*x.shape[:-1], layer.out_features)


# -----------------------------------------------------------------------------
# dispatch

def choose_impl(x, layer):
    """What impl="auto" runs for this input and layer."""
    if x.dtype == torch.bfloat16 and native_supported(layer, x.device):
        return "native"
    if x.device.type == "cuda" and triton is not None:
        return "triton"
    return "compiled" if layer.in_features * layer.out_features >= COMPILE_MIN_NUMEL else "eager"


def qmatmul(x, layer, impl="auto", pooled=None):
    """y [..., out] = x [..., in] @ w~^T (+ layer.bias). `pooled` (optional) is pool_groups(x, group_size),
    computed once by QA-LoRA's adapter and shared with the bias term of the grouped paths."""
    assert x.shape[-1] == layer.in_features, (
        f"qmatmul: input width {x.shape[-1]} does not match layer in_features={layer.in_features}")
    plan = layer.__dict__.get("_frozen")
    if plan is not None and torch.compiler.is_compiling():
        return _frozen_matmul(x, layer, plan)
    if impl == "auto":
        impl = choose_impl(x, layer)
    if impl == "reference":
        return reference(x, layer)
    if impl == "compiled":
        return grouped(x, layer, pooled, compiled=True)
    if impl == "eager":
        return grouped(x, layer, pooled, compiled=False)
    if impl == "native":
        return native(x, layer)
    if impl == "triton":
        return triton_qmatmul(x, layer)
    raise ValueError(f"qmatmul: unknown impl {impl!r}; use one of {IMPLS}")


# -----------------------------------------------------------------------------
# frozen plans: a whole decode step as one torch.compile graph (generate.py)
#
# The caches above are keyed on data_ptr/_version, which torch.compile cannot trace: every lookup would
# split a model-wide graph in two (~200 pieces for SmolLM2). `freeze(model, dtype)` therefore resolves,
# eagerly, what each QuantLinear runs for a small-M input of that dtype and the derived tensors it needs,
# and stores them on the layer; inside a compiled region qmatmul then reads only tensors and Python
# constants. Scales and biases are read from the layer's buffers where the math allows it, so an in-place
# merge is seen; the native path's bf16 scale-and-zero copy is derived, so freeze again after changing the
# model (generate() freezes before every generation: cheap, and when nothing changed the same tensors come
# back and the compiled graph is reused). Eager calls ignore the plans.

def _plan(layer, dtype):
    x = torch.empty(1, layer.in_features, dtype=dtype, device=layer.qweight.device)
    impl = layer.impl if layer.impl != "auto" else choose_impl(x, layer)
    if impl == "native":
        return ("native", _native_weight(layer), _native_scales_zeros(layer))
    if impl in ("compiled", "eager"):
        return ("gemv", _natural_planes(layer))  # the layout is derived from the layer where it is used
    return None  # reference/triton cache nothing: qmatmul calls them as usual


def freeze(model, dtype):
    """Store every QuantLinear's decode plan for activations of `dtype` (see above). Linears that a module
    declares as reading one input (its `fusable` names: q/k/v, gate/up) are fused into one layer with its
    own plan, stored on the first of them as `_fused` (model.project calls it); the fused members then need
    no plan of their own (inside the graph only the fused layer runs)."""
    import quant
    unfreeze(model)
    fused_members = set()
    for m in model.modules():
        for names in getattr(m, "fusable", ()):
            layers = [getattr(m, n) for n in names]
            fused = _fused_layer(layers)
            plan = _plan(fused, dtype) if fused is not None else None  # None for reference/triton layers
            if plan is not None:
                fused.__dict__["_frozen"] = plan
                layers[0].__dict__["_fused"] = fused
                fused_members.update(map(id, layers))
    for m in model.modules():
        if isinstance(m, quant.QuantLinear) and id(m) not in fused_members:
            plan = _plan(m, dtype)
            if plan is not None:
                m.__dict__["_frozen"] = plan


def unfreeze(model):
    for m in model.modules():
        m.__dict__.pop("_frozen", None)
        m.__dict__.pop("_fused", None)


def _fused_layer(layers):
    """One QuantLinear whose output is the concatenated outputs of `layers` (codes, scales, biases and any
    bias concatenated along out), or None unless they are QuantLinears of one input width, bit width,
    group size and impl. Cached on the first layer, keyed on every buffer, so an in-place merge rebuilds
    it at the next freeze. Memory: a second copy of the fused layers' codes while cached."""
    import quant
    first = layers[0]
    same = ("in_features", "bits", "group_size", "impl")
    if not all(isinstance(l, quant.QuantLinear) for l in layers) or len({
            tuple(getattr(l, a) for a in same) + (l.bias is None,) for l in layers}) != 1:
        return None

    def build():
        fused = quant.QuantLinear(first.in_features, sum(l.out_features for l in layers), first.bits,
                                  first.group_size, bias=first.bias is not None).to(first.qweight.device)
        fused.impl = first.impl
        for name in ("qweight", "scales", "biases", "bias"):
            if getattr(first, name) is not None:
                setattr(fused, name, torch.cat([getattr(l, name) for l in layers]))
        return fused

    deps = [t for l in layers for t in (l.qweight, l.scales, l.biases, l.bias) if t is not None]
    return _cached(first, "fused", deps, build)


def _natural_planes(layer):
    """The planes layout with the codes, not the input, permuted: byte j of group g holds, as plane t, the
    code of column g*G + t*G/c + j. Plane t of a group is then a contiguous slice of the input, so the
    input needs no transpose: inside a model-wide graph inductor would fuse that transpose into the
    reduction as a gather repeated for every output row (SmolLM2 decode, 2 threads: 15 vs 40 tokens/s)."""
    def build():
        import quant
        e, c, G, Kp = _layout(layer)
        N = layer.out_features
        q = _padded_codes(layer).view(N, layer.n_groups, c, G // c).transpose(2, 3).reshape(N, Kp)  # c codes per byte
        return quant.pack(q, e).view(N, layer.n_groups, G // c)
    return _cached(layer, "natural_planes", (layer.qweight,), build)


def _frozen_matmul(x, layer, plan):
    x2 = x.reshape(-1, layer.in_features)
    if plan[0] == "native":
        y = _native_mm(x2, layer, *plan[1:])
    elif plan[0] == "gemv":
        P = plan[1]
        _, c, G, Kp = _layout(layer)
        xp = F.pad(x2.float(), (0, Kp - layer.in_features)).view(-1, Kp // G, c, G // c)  # a view: no transpose
        y = _whole_layer(xp, P, layer, compiled=False).to(x.dtype)  # already inside the caller's graph
    return y.reshape(*x.shape[:-1], layer.out_features)


# -----------------------------------------------------------------------------
# triton: dequantize a tile in registers, then tl.dot (CUDA; tested on CPU under TRITON_INTERPRET=1)
#
# The usual int4 GEMM shape (AutoGPTQ/GPTQ-triton, gpt-fast's tinygemm in spirit): each program owns a
# BLOCK_M x BLOCK_N tile of y and walks K in BLOCK_K steps, loading the packed codes of a
# [BLOCK_N, BLOCK_K] tile once (e bits per code, c = 8/e codes per byte, the planes layout above, so
# the codes of 2/4/8-bit layers are read straight from layer.qweight), unpacking with shift-and-mask,
# applying w = scales * q + biases per (row, group) and accumulating x_tile @ w_tile^T in fp32.
# What to expect on a GPU (not measured here: no GPU on this machine): for prefill/training (M >= 64)
# compute-bound like a bf16 GEMM plus the unpack (fp32 inputs use input_precision="ieee" to keep the 1e-4 of
# the fp32 paths, so they run at fp32 SIMT speed, not on tensor cores as TF32 would); for decode (M = 1)
# memory-bound, reading bits/8 bytes per weight + 8 bytes per (row, group), i.e. ~4x less traffic than fp16
# at 4 bits/group 128;
# BLOCK_M = 16 is the smallest tile tl.dot accepts, so M = 1 wastes tensor-core work (not bandwidth);
# BLOCK_M grows with M up to 64, so prefill/training dequantizes each weight tile once per 64 rows.
# A split-K GEMV would do better at M = 1 on big GPUs; it is left out to keep one readable kernel.

if triton is not None:
    @triton.jit
    def _triton_qmm_kernel(x_ptr, p_ptr, s_ptr, b_ptr, y_ptr, M, N, K, n_groups, G, Pw,
                           E: tl.constexpr, C: tl.constexpr, FP32: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        mask_m, mask_n = offs_m < M, offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK] input columns (planes order is not needed here)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)  # [BM, BK]
            # column k of group g lives in byte g*G/C + (k % G) // C at shift ((k % G) % C) * E
            g = offs_k // G
            kin = offs_k % G
            byte = g * (G // C) + kin // C
            packed = tl.load(p_ptr + offs_n[:, None] * Pw + byte[None, :], mask=mask_n[:, None] & mask_k[None, :],
                             other=0)  # [BN, BK] uint8
            q = (packed.to(tl.int32) >> ((kin % C) * E)[None, :]) & ((1 << E) - 1)
            sb = offs_n[:, None] * n_groups + g[None, :]
            sc = tl.load(s_ptr + sb, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            bi = tl.load(b_ptr + sb, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            w = q.to(tl.float32) * sc + bi  # [BN, BK] dequantized in registers
            if FP32:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


class _TritonMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, layer):
        ctx.layer = layer
        e, c, G, Kp = _layout(layer)
        P = _planes(layer).reshape(layer.out_features, -1)  # [N, Kp / c] bytes
        M, K = x2.shape
        N = layer.out_features
        y = torch.empty(M, N, device=x2.device, dtype=torch.float32)
        # tile rows: 16 is the smallest tl.dot takes (decode); larger M gets taller tiles, so each tile of
        # codes is loaded and dequantized once per 64 rows of x rather than once per 16 (GPTQ-triton's configs)
        BM, BN, BK = min(64, max(16, triton.next_power_of_2(M))), 64, 32
        grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
        _triton_qmm_kernel[grid](x2.contiguous(), P, layer.scales.float().contiguous(), layer.biases.float().contiguous(),
                                 y, M, N, K, layer.n_groups, G, P.shape[1], E=e, C=c,
                                 FP32=x2.dtype == torch.float32, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
        return y.to(x2.dtype)

    @staticmethod
    def backward(ctx, gy):
        return _grad_input(gy.float(), ctx.layer, compiled=gy.is_cuda).to(gy.dtype), None


def triton_qmatmul(x, layer):
    assert triton is not None, "qmatmul: impl='triton' needs triton (pip install triton); use impl='auto'"
    x2 = x.reshape(-1, layer.in_features)
    y = _TritonMatmul.apply(x2, layer)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features)
