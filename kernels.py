"""
Dequant-matmul kernels for a quantized linear layer, where

    w~[o, i] = scales[o, g] * q[o, i] + biases[o, g]        g = the group of input column i

the bit layout of the codes, the group pooling QA-LoRA's adapter reads, and one dispatch,
`qmatmul(x, layer, impl)`. A "layer" is anything with quant.QuantLinear's attributes (qweight, scales,
biases, bias, bits, group_size, in_features, out_features, n_groups); nothing here imports the project.

Every path computes y = x @ w~^T (+ bias); they differ in where the codes are unpacked. The one-pass
kernels (gemv, Triton) use its grouped form, which never forms w~:

    y = sum_g scales_g * (x_g @ q_g^T)  +  sum_g biases_g * sum(x_g)   (+ bias)

- "reference": unpack, dequantize, one float32 matmul. The definition; every other path is tested
  against it (tests/test_kernels.py).
- "gemv": kernels_cpu.cpp, built with the system's C++ compiler on first use: one pass over the packed
  codes for up to GEMV_MAX_M rows of x, any bit width, float32 accumulation, PyTorch's threads over the
  output rows. float32 inputs are float32 math; bfloat16 inputs of 2/4/8-bit layers are read as 16-bit
  fixed point per block of x (exact for bf16 values within 2^-7 of the block's largest), integer products. Decode and the one-token forward, where reading the weights is the whole cost. It is an
  opaque operator, so a torch.compile'd decode step (generate.py) calls the same kernel.
- "compiled": w~ dequantized a chunk of rows at a time, then the BLAS matmul (prefill, evaluation,
  training); the dequantization is kernels_cpu.cpp's on the CPU, else a torch.compile graph. "eager" is
  the same without torch.compile (tiny layers, or QALORA_COMPILE=0, which builds nothing).
- "native": PyTorch's bfloat16 int4 kernel (4 bits, groups of 32-256 dividing the row).
- "triton": a CUDA dequant-matmul (optional import; tested on CPU under TRITON_INTERPRET=1).

"auto" (QuantLinear's default; `choose_impl` says what it picks), first rule that applies:
    CUDA and triton importable                  -> triton
    M <= GEMV_MAX_M rows and the gemv is built  -> gemv      (float32 math for float32 inputs)
    bfloat16 input, the layer fits native, and  -> native    (the caller chose bf16 precision)
      CUDA or a CPU with bf16 dot products
    out * in >= COMPILE_MIN_NUMEL               -> compiled
    otherwise                                   -> eager
Float32 inputs never go through bfloat16 behind the caller's back: the exact merge is checked in fp32.

Autograd: the base is frozen, so only the input gradient is needed, grad_x = grad_y @ w~, computed for
every path as "compiled" computes its forward (w~ a chunk of rows at a time). The biases and scales are read afresh at every call (the merge
rewrites the biases); derived code layouts are cached on the layer (`layer.kernel_cache`), keyed by the
version of the tensors they come from.

Set QALORA_COMPILE=0 to build and compile nothing: the grouped code then runs eagerly everywhere.
"""
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # optional accelerator
    triton = None

IMPLS = ("reference", "gemv", "compiled", "eager", "native", "triton", "auto")
GEMV_MAX_M = 8  # rows the gemv takes (its accumulators are unrolled per row)
COMPILE_MIN_NUMEL = 1 << 16  # auto compiles layers with out*in >= this; tiny ones run eagerly
NATIVE_RTOL = 1e-2  # stated tolerance of the bf16 native path (measured ~2.5e-3, normwise)
NATIVE_GROUPS = (32, 64, 128, 256)
COMPILE = os.environ.get("QALORA_COMPILE", "1") != "0"


# -----------------------------------------------------------------------------
# groups and the bit layout

def effective_group_size(in_features, group_size):
    """-1 means one group per row; a group larger than the row is the row."""
    return in_features if group_size == -1 else min(group_size, in_features)


def group_sizes(in_features, group_size):
    """Width of each group: [gs, gs, ..., gs, rest]; e.g. (172, 32) -> [32]*5 + [12]."""
    gs = effective_group_size(in_features, group_size)
    n_full, rest = divmod(in_features, gs)
    return [gs] * n_full + ([rest] if rest else [])


def group_widths(in_features, group_size, device=None, dtype=torch.float32):
    """group_sizes as a tensor [n_groups]."""
    return torch.tensor(group_sizes(in_features, group_size), device=device, dtype=dtype)


def expand_groups(p, in_features, group_size):
    """Per-group parameter [out, n_groups] -> per-column [out, in] (the short last group is cut)."""
    out, n_groups = p.shape
    gs = effective_group_size(in_features, group_size)
    return p.unsqueeze(2).expand(out, n_groups, gs).reshape(out, n_groups * gs)[:, :in_features]


def dequantize(q, scales, biases, group_size):
    """w~ = scales * q + biases, per (row, group). -> float32 [out, in]."""
    in_features = q.shape[1]
    assert scales.shape == biases.shape == (q.shape[0], len(group_sizes(in_features, group_size))), (
        f"scales {tuple(scales.shape)} / biases {tuple(biases.shape)} do not match codes {tuple(q.shape)} "
        f"with group_size={group_size}")
    s = expand_groups(scales.float(), in_features, group_size)  # [out, in]
    b = expand_groups(biases.float(), in_features, group_size)  # [out, in]
    return s * q.float() + b


# The bit layout: each row of codes is one LSB-first bit stream: code j occupies stream bits
# [j*bits, (j+1)*bits), least significant bit first, and stream bit b is bit (b % 8) of
# byte b // 8. The row is padded with zero bits to a whole number of bytes, so a row of
# `in` codes takes ceil(in * bits / 8) bytes. Consequences: 8 bits is the identity;
# 4 bits puts code 2k in the low nibble of byte k and code 2k+1 in the high nibble;
# 2 bits puts code 4k+t at bits [2t, 2t+2) of byte k; 3 bits packs 8 codes into 3 bytes
# with codes crossing byte boundaries (no wasted bits); 5 and 6 bits likewise (8 codes in 5 or 6 bytes).

def packed_width(in_features, bits):
    return (in_features * bits + 7) // 8


def pack(q, bits):
    """q uint8 [out, in] with values < 2^bits -> packed uint8 [out, ceil(in*bits/8)]."""
    assert 1 <= bits <= 8, f"pack: {bits} bits per code"
    assert q.dim() == 2, f"pack expects codes [out, in], got shape {tuple(q.shape)}"
    out, in_features = q.shape
    q = q.to(torch.int32)
    assert q.numel() == 0 or (q.min() >= 0 and q.max() < 2**bits), f"codes out of range for {bits} bits"
    nbytes = packed_width(in_features, bits)
    if 8 % bits == 0:  # 2, 4, 8: whole codes per byte
        per = 8 // bits
        q = F.pad(q, (0, nbytes * per - in_features))  # [out, nbytes*per]
        shifts = torch.arange(per, dtype=torch.int32) * bits  # [per]
        return (q.view(out, nbytes, per) << shifts).sum(dim=2).to(torch.uint8)
    # general case (3 bits): spell the bit stream out, then regroup it into bytes
    bit = torch.arange(bits, dtype=torch.int32)
    stream = ((q.unsqueeze(2) >> bit) & 1).reshape(out, in_features * bits)  # [out, in*bits]
    stream = F.pad(stream, (0, nbytes * 8 - in_features * bits))  # [out, nbytes*8]
    return (stream.view(out, nbytes, 8) << torch.arange(8, dtype=torch.int32)).sum(dim=2).to(torch.uint8)


def unpack(packed, bits, in_features):
    """Inverse of pack: packed uint8 [out, ceil(in*bits/8)] -> codes uint8 [out, in]."""
    assert 1 <= bits <= 8, f"unpack: {bits} bits per code"
    out, nbytes = packed.shape
    assert nbytes == packed_width(in_features, bits), (
        f"packed width {nbytes} does not match in_features={in_features} at {bits} bits")
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32) * bits  # [per]
        q = (p.unsqueeze(2) >> shifts) & (2**bits - 1)  # [out, nbytes, per]
        return q.reshape(out, nbytes * per)[:, :in_features].to(torch.uint8)
    stream = (p.unsqueeze(2) >> torch.arange(8, dtype=torch.int32)) & 1  # [out, nbytes, 8]
    stream = stream.reshape(out, nbytes * 8)[:, : in_features * bits].view(out, in_features, bits)
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(dim=2).to(torch.uint8)



# -----------------------------------------------------------------------------
# pooling: QA-LoRA's adapter input, and the group sums of the bias term

def pool_groups(x, group_size):
    """Group means along the last dim: [..., in] -> [..., n_groups]. Groups are consecutive runs of
    `group_size` columns (-1: the whole row); a short last group averages over its own width."""
    in_features = x.shape[-1]
    gs = effective_group_size(in_features, group_size)
    n_full, rest = divmod(in_features, gs)
    pooled = x[..., :n_full * gs].reshape(*x.shape[:-1], n_full, gs).mean(dim=-1)  # [..., n_full]
    if rest:  # the short last group: its own mean
        pooled = torch.cat([pooled, x[..., n_full * gs:].mean(dim=-1, keepdim=True)], dim=-1)  # [..., n_groups]
    return pooled


# -----------------------------------------------------------------------------
# per-layer caches of derived tensors (code layouts, the native kernel's packed weight), in the dict the
# layer provides as `kernel_cache`, keyed by the identity and in-place version of the tensors they come
# from, so copy_/load_state_dict/.to() invalidate them.

def _key(*tensors):
    return tuple((t.data_ptr(), t._version, t.device, t.dtype, tuple(t.shape)) for t in tensors)


def _cached(layer, name, deps, build):
    cache = getattr(layer, "kernel_cache", None)
    if cache is None:
        return build()
    key = _key(*deps)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = (key, build())
        cache[name] = hit
    return hit[1]


# -----------------------------------------------------------------------------
# reference: the definition

def reference(x, layer):
    """y = x @ w~^T (+ bias) in float32, returned in x's dtype; autograd flows through the matmul."""
    w = dequantize(unpack(layer.qweight, layer.bits, layer.in_features), layer.scales, layer.biases,
                   layer.group_size)  # [out, in] f32
    y = x.float() @ w.T  # [..., out]
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype)


# -----------------------------------------------------------------------------
# gemv: the C++ kernel (kernels_cpu.cpp), built once per machine and cached

_gemv_state = {}


def gemv_available():
    """Is torch.ops.qalora.gemv usable? Builds kernels_cpu.cpp on the first call (one warning on failure)."""
    if "ok" not in _gemv_state:
        _gemv_state["ok"] = COMPILE and _load_cpu_kernels()
    return _gemv_state["ok"]


def _load_cpu_kernels():
    src = Path(__file__).with_name("kernels_cpu.cpp")
    from torch.utils import cpp_extension
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None or not src.is_file():
        warnings.warn("kernels: no C++ compiler (or kernels_cpu.cpp) found: the gemv is off, "
                      "one-row matmuls take the compiled path")
        return False
    cpu = ""
    if os.path.isfile("/proc/cpuinfo"):  # the build is -march=native: one build per CPU model and features
        cpu = "".join(l for l in open("/proc/cpuinfo") if l.startswith(("model name", "flags")))[:4096]
    tag = hashlib.sha256(src.read_bytes() + f"{torch.__version__}{cxx}{platform.machine()}{cpu}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("QALORA_CACHE") or Path.home() / ".cache" / "qalora")
    lib = cache / f"kernels_cpu-{tag}.so"
    if not lib.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        libdirs = cpp_extension.library_paths()
        cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", str(src)]
        cmd += [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-L{p}" for p in libdirs]
        cmd += ["-lc10", "-ltorch_cpu"] + [f"-Wl,-rpath,{p}" for p in libdirs]
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        print("kernels: building the C++ gemv (once per machine)...", file=sys.stderr, flush=True)
        for arch in (["-march=native"], []):  # -march=native where the compiler knows it
            r = subprocess.run(cmd[:1] + arch + cmd[1:] + ["-o", tmp], capture_output=True, text=True)
            if r.returncode == 0:
                break
        if r.returncode != 0:
            os.unlink(tmp)
            warnings.warn(f"kernels: building kernels_cpu.cpp failed, the gemv is off: {r.stderr.strip()[-300:]}")
            return False
        os.replace(tmp, lib)
    torch.ops.load_library(str(lib))

    @torch.library.register_fake("qalora::gemv")
    def _(x, qweight, scales, biases, bits, group_size):
        return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)

    @torch.library.register_fake("qalora::dequant")
    def _(planes, scales, biases, e):
        return scales.new_empty(planes.shape[0], planes.shape[1] * planes.shape[2] * (8 // e))
    return True


def pack_blocks(blocks, final_norm=None):
    """The tensors of consecutive LLaMA blocks as decode_step takes them, gathered once per decode session.
    `blocks`: (norm1, norm2, linears, cache_k, cache_v) per block, `linears` its seven quantized linears (q, k,
    v, o, gate, up, down: anything with QuantLinear's attributes and no bias). `final_norm`, a norm weight:
    decode_step returns the last block's output normed by it (the model's final norm, same eps)."""
    norms, caches, lins = [], [], []
    for norm1, norm2, linears, cache_k, cache_v in blocks:
        norms += [norm1, norm2]
        caches += [cache_k, cache_v]
        lins += list(linears)
    if final_norm is not None:
        norms.append(final_norm)
    return (norms, caches, [l.qweight for l in lins], [l.scales for l in lins], [l.biases for l in lins],
            [l.bits for l in lins], [l.group_size for l in lins])


def decode_step(h, packed, cos, sin, pos, n_heads, eps):
    """One decode step of the packed blocks (pack_blocks) for one token, as one C++ call (kernels_cpu.cpp's
    decode_step): h [1, 1, dim] -> [1, 1, dim]; each block's k and v are written to its caches at `pos`."""
    return torch.ops.qalora.decode_step(h, *packed, cos, sin, eps, pos, n_heads)


def gemv_codes(x2, qweight, scales, biases, bits, group_size):
    """x2 [M <= GEMV_MAX_M, in] @ the packed codes' weights^T -> [M, out] in float32, one pass over them.
    float32 x2 is exact float32 math; bfloat16 x2 is read as 16-bit fixed point (kernels_cpu.cpp's lane rows)."""
    x2 = x2.contiguous() if x2.dtype == torch.bfloat16 else x2.float().contiguous()
    return torch.ops.qalora.gemv(x2, qweight, scales.float().contiguous(), biases.float().contiguous(), bits,
                                 group_size)


def gemv(x2, layer):
    """x2 [M <= GEMV_MAX_M, in] -> [M, out] in float32 (+ layer.bias), one pass over the packed codes."""
    y = gemv_codes(x2, layer.qweight, layer.scales, layer.biases, layer.bits, layer.group_size)
    return y + layer.bias.float() if layer.bias is not None else y


# -----------------------------------------------------------------------------
# compiled: the grouped formulation, dequantizing a chunk of rows at a time
#
# Code layout ("planes"): per row, the codes padded to n_groups * G (G = group_size; a short last group
# is padded with code 0, whose scales*q term is 0) are packed with e = 2, 4 or 8 bits per code, LSB
# first: c = 8 // e codes per byte, byte k of a row holds codes c*k + t at bits [t*e, (t+1)*e).
# That is exactly pack's layout, so for 2, 4 and 8 bits with in % G == 0 the layout IS
# layer.qweight (no copy); 3-bit codes are stored in nibbles (e = 4), unaligned widths are padded,
# and codes are widened when a group's plane would be shorter than 16 (2 bits at group 32: nibbles).
# Viewed as [out, n_groups, G/c] bytes, code t of byte j pairs with input column g*G + c*j + t, so the
# input is permuted once per call to [M, n_groups, c, G/c] ("x planes") and every plane t is a
# contiguous, vectorizable stream.

def _layout(layer):
    """(e, c, G, padded width) of the planes layout for this layer."""
    G = layer.group_size
    e = next(w for w in (2, 4, 8) if w >= layer.bits)  # 3 bits in nibbles, 5 and 6 in bytes
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
        return pack(_padded_codes(layer), e).view(N, layer.n_groups, G // c)

    return _cached(layer, "planes", (layer.qweight,), build)


def _padded_codes(layer):
    """The codes as uint8 [out, n_groups * G], code 0 in the padding of a short last group."""
    _, _, _, Kp = _layout(layer)
    return F.pad(unpack(layer.qweight, layer.bits, layer.in_features), (0, Kp - layer.in_features))


def _x_planes(x2, c, G, Kp, copy=True):
    """[M, K] -> [M, n_groups, c, G/c]: column g*G + c*j + t goes to [g, t, j] (copy=False: a strided view)."""
    M, K = x2.shape
    if Kp != K:
        x2 = F.pad(x2, (0, Kp - K))
    xp = x2.view(M, Kp // G, G // c, c).transpose(2, 3)
    return xp.contiguous() if copy else xp


def _dequant_w(P, scales, biases, e: int, c: int):
    """w~ = scales * q + biases in planes column order: [N, ng, G/c] codes -> [N, ng*G] f32, column g*G + t*(G/c) + j
    holding code c*j + t of group g (the order of _x_planes, so x_planes @ this^T is x @ w~^T; padding columns get
    biases too, but their inputs are zero and their gradients are cut). Column k reads byte k % (G/c) at shift
    (k // (G/c)) * e: written as an index expression (repeat and arange), inductor makes it one vectorized pass
    from bytes to f32. The CPU takes kernels_cpu.cpp's dequant instead (dequant_planes)."""
    N, ng, Gc = P.shape
    shifts = torch.arange(c * Gc, device=P.device, dtype=torch.int32) // Gc * e  # [G]
    q = (P.repeat(1, 1, c).to(torch.int32) >> shifts) & ((1 << e) - 1)  # [N, ng, G]
    return (q.to(torch.float32) * scales[:, :, None] + biases[:, :, None]).reshape(N, ng * Gc * c)  # [N, Kp]


def dequant_planes(P, scales, biases, e, c, compiled):
    """_dequant_w: the C++ op on the CPU when it is built (bound by writing 4 bytes a weight: 5-10x inductor's
    graph here), else the torch graph, compiled unless compiled=False."""
    if P.device.type == "cpu" and gemv_available():
        return torch.ops.qalora.dequant(P, scales, biases, e)
    return _run(_dequant_w, compiled, P, scales, biases, e, c)


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


def _w_chunks(layer, compiled):
    """Yield (row slice, w~ of those rows in planes column order, f32 [rows, Kp]), about CHUNK_NUMEL weights at a
    time (a small layer is one chunk)."""
    e, c, G, Kp = _layout(layer)
    P, scales, biases = _planes(layer), layer.scales.float(), layer.biases.float()
    N = layer.out_features
    nb = _row_chunk(N, Kp)
    for i in range(0, N, nb):
        yield slice(i, i + nb), dequant_planes(P[i:i + nb], scales[i:i + nb], biases[i:i + nb], e, c, compiled)


def _grad_input(gy, layer, compiled):
    """grad_x = grad_y @ w~, a chunk of w~'s rows at a time, then from planes back to natural column order."""
    e, c, G, Kp = _layout(layer)
    gxp = None  # [M, Kp], planes order
    for rows, w in _w_chunks(layer, compiled):
        gxp = gy[:, rows] @ w if gxp is None else gxp.addmm_(gy[:, rows], w)
    gx = gxp.view(-1, Kp // G, c, G // c).transpose(2, 3).reshape(-1, Kp)
    return gx[:, :layer.in_features]


def grouped(x2, layer, compiled=True):
    """y = x2 @ w~^T (+ bias) without autograd, w~ dequantized a chunk of rows at a time (the "compiled" impl;
    compiled=False: "eager", nothing compiled)."""
    e, c, G, Kp = _layout(layer)
    xp = _x_planes(x2.float(), c, G, Kp).view(x2.shape[0], Kp)  # the input in planes column order
    ys = [xp @ w.T for _, w in _w_chunks(layer, compiled)]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)  # [M, out]
    return y + layer.bias.float() if layer.bias is not None else y


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
        q = unpack(layer.qweight, 4, layer.in_features)  # [N, K] uint8
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


def native(x2, layer):
    """x2 [M, in] -> y [M, out] in x2's dtype through the bf16 int4 kernel."""
    if not native_supported(layer, x2.device):
        raise ValueError(f"qmatmul: impl='native' needs bits=4, group_size in {NATIVE_GROUPS} dividing in_features "
                         f"and out_features % 16 == 0; got bits={layer.bits}, group_size={layer.group_size}, "
                         f"in={layer.in_features}, out={layer.out_features}")
    return _native_mm(x2, layer, _native_weight(layer), _native_scales_zeros(layer))


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


def triton_matmul(x2, layer):
    """x2 [M, in] (CUDA) -> y [M, out] (+ layer.bias) in x2's dtype."""
    if triton is None:
        raise ValueError("qmatmul: impl='triton' needs triton (pip install triton); use impl='auto'")
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
    y = y.to(x2.dtype)
    return y + layer.bias.to(y.dtype) if layer.bias is not None else y


# -----------------------------------------------------------------------------
# dispatch

def cpu_has_bf16():
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX, as oneDNN sees it)? Without it PyTorch's
    bf16 kernels convert in software and run slower than the float32 path (M=448 x 576x1536, AMD EPYC with
    AVX2: native 24 ms, compiled 10-16 ms)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_impl(x, layer):
    """What impl="auto" runs for this input and layer (the rules in the module docstring)."""
    M = x.numel() // x.shape[-1] if x.numel() else 0
    if x.device.type == "cuda" and triton is not None:
        return "triton"
    if M <= GEMV_MAX_M and x.device.type == "cpu" and gemv_available():
        return "gemv"
    if x.dtype == torch.bfloat16 and native_supported(layer, x.device) and (x.device.type != "cpu" or cpu_has_bf16()):
        return "native"
    return "compiled" if layer.in_features * layer.out_features >= COMPILE_MIN_NUMEL else "eager"


def _forward(x2, layer, impl):
    """y [M, out] = x2 [M, in] @ w~^T (+ bias) by `impl`, without autograd, in float32 (native and triton:
    in x2's dtype)."""
    if impl == "gemv":
        if x2.shape[0] > GEMV_MAX_M:
            raise ValueError(f"qmatmul: impl='gemv' takes at most {GEMV_MAX_M} rows, got {x2.shape[0]}")
        if not gemv_available():
            raise ValueError("qmatmul: impl='gemv' needs the C++ kernel, which could not be built (see the warning)")
        return gemv(x2, layer)
    if impl in ("compiled", "eager"):
        return grouped(x2, layer, compiled=impl == "compiled")
    if impl == "native":
        return native(x2, layer)
    if impl == "triton":
        return triton_matmul(x2, layer)
    raise ValueError(f"qmatmul: unknown impl {impl!r}; use one of {IMPLS}")


class _QuantMatmul(torch.autograd.Function):
    """x2 [M, in] -> x2 @ w~^T by any impl; backward grad_x = grad_y @ w~ (the frozen base has no grads)."""

    @staticmethod
    def forward(ctx, x2, layer, impl):
        ctx.layer = layer
        return _forward(x2, layer, impl)

    @staticmethod
    def backward(ctx, gy):
        return _grad_input(gy.float(), ctx.layer, compiled=gy.device.type != "cuda").to(gy.dtype), None, None


def qmatmul(x, layer, impl="auto"):
    """y [..., out] = x [..., in] @ w~^T (+ layer.bias), in x's dtype."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"qmatmul: input width {x.shape[-1]} does not match layer in_features={layer.in_features}")
    if impl == "auto":
        impl = choose_impl(x, layer)
    if impl == "reference":
        return reference(x, layer)
    x2 = x.reshape(-1, layer.in_features)
    if torch.is_grad_enabled() and x2.requires_grad:
        y = _QuantMatmul.apply(x2, layer, impl)
    else:
        y = _forward(x2, layer, impl)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)

