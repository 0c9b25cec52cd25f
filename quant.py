"""
Weight quantization: min-max round-to-nearest (RTN), GPTQ, QuantLinear, and whole-model quantization
with calibration (the command line is quantize.py; the bit layout is kernels.py's).

Convention (DESIGN.md, "The algorithm in one screen"): a weight W [out, in] is cut along
`in` into consecutive groups of `group_size` columns (the last group is shorter when `in`
is not a multiple), and every (row o, group g) has its own affine map

    w~[o, i] = scales[o, g] * q[o, i] + biases[o, g],    q in {0, ..., 2^bits - 1}

the paper's alpha*W^ + beta, MLX's affine mode, llama.cpp's Q4_1 `d*q + m`. Min-max RTN
picks biases = min and scales = (max - min) / (2^bits - 1), so both ends of every group
are hit exactly. scales and biases are float32 (QA-LoRA's merge adds a non-integer to
the biases, so an integer zero point would not do).
"""
import contextlib
import sys

import torch
import torch.nn as nn

import kernels
from cli import UserError
# the bit layout lives in kernels.py; quant.dequantize, pack, unpack and group_sizes stay importable here
from kernels import dequantize, effective_group_size, expand_groups, group_sizes, pack, packed_width, unpack  # noqa: F401

BITS = (2, 3, 4, 5, 6, 8)


def check_bits_group(bits, group_size):
    if bits not in BITS:
        raise UserError(f"bits={bits!r} is not supported; use one of {BITS}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size > 0 or group_size == -1):
        raise UserError(f"group_size={group_size!r} must be a positive integer, or -1 for whole rows")


# -----------------------------------------------------------------------------
# groups

def _group_reduce(w, group_size, op):
    """op (torch.amin / torch.amax) over each group of columns: [out, in] -> [out, n_groups]."""
    out, in_features = w.shape
    gs = effective_group_size(in_features, group_size)
    n_full = in_features // gs
    parts = [op(w[:, : n_full * gs].reshape(out, n_full, gs), dim=2)]  # [out, n_full]
    if in_features % gs:  # the short last group
        parts.append(op(w[:, n_full * gs:], dim=1, keepdim=True))  # [out, 1]
    return torch.cat(parts, dim=1)


# -----------------------------------------------------------------------------
# min-max RTN

def _find_params(w, bits):
    """Min-max affine parameters of one group (or of each row of w [out, n]) -> scales, biases [out]."""
    wmin, wmax = w.amin(dim=1), w.amax(dim=1)
    return (wmax - wmin) / (2**bits - 1), wmin


def _round(w, scales, biases, bits):
    """q = clamp(round((w - biases) / scales), 0, 2^bits - 1). A constant group has scale 0:
    divide by 1 instead, so q = 0 and scale * q + bias = bias is the constant, exactly."""
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    return torch.round((w - biases) / safe).clamp_(0, 2**bits - 1)


def quantize(w, bits, group_size):
    """Min-max RTN. w [out, in] -> q uint8 [out, in], scales f32 [out, G], biases f32 [out, G],
    G = ceil(in / group_size) (group_size -1: G = 1)."""
    check_bits_group(bits, group_size)
    assert w.dim() == 2, f"quantize expects a 2-D weight [out, in], got shape {tuple(w.shape)}"
    w = w.detach().float()
    in_features = w.shape[1]
    wmin = _group_reduce(w, group_size, torch.amin)  # [out, G]
    wmax = _group_reduce(w, group_size, torch.amax)  # [out, G]
    scales, biases = (wmax - wmin) / (2**bits - 1), wmin
    q = _round(w, expand_groups(scales, in_features, group_size), expand_groups(biases, in_features, group_size), bits)
    return q.to(torch.uint8), scales, biases


# -----------------------------------------------------------------------------
# GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, arXiv 2210.17323)
#
# Quantize the columns of W one at a time; after each column, spread its rounding error
# over the columns not yet quantized, weighted by the inverse Hessian of the layer's
# objective ||W X - W~ X||^2 (H = X X^T, X the layer's inputs). This is the loop of the
# reference implementation (IST-DASLab/gptq, gptq.py `fasterquant`), line for line:
# dead columns, relative dampening, the upper Cholesky factor of H^-1, lazy updates in
# blocks of `block_size` columns, group parameters found when a group starts, act-order.

def _cholesky_inverse_upper(H, damp):
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1; on failure retry with 10x damp."""
    H = H.clone()
    diag = torch.arange(H.shape[0])
    base = H.diagonal().mean()
    for attempt in range(5):
        Hd = H.clone()
        Hd[diag, diag] += damp * base
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U
        if attempt < 4:
            print(f"warning: gptq: Hessian not positive definite with damp={damp:g}; "
                  f"retrying with damp={damp * 10:g}", file=sys.stderr)
        damp *= 10
    raise UserError("gptq: Hessian is not positive definite even with heavy dampening; check the calibration data")


@contextlib.contextmanager
def _one_thread():
    """GPTQ's column loop is thousands of tiny ops, where intra-op threads cost more than they
    give (on a busy 2-core machine torch.cholesky_inverse of a 1536^2 matrix took 20 s on 2 threads,
    0.13 s on 1, and the loop 35x longer): run the solver single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq(w, H, bits, group_size, damp=0.01, block_size=128, act_order=False, static_groups=False):
    """GPTQ one layer. w [out, in], H [in, in] ~ X X^T (any positive multiple).
    Returns (q uint8 [out, in], scales f32 [out, G], biases f32 [out, G]) in the original column
    order, with consecutive groups exactly as `quantize` (short last group included)."""
    with _one_thread():
        return _gptq(w, H, bits, group_size, damp, block_size, act_order, static_groups)


def _gptq(w, H, bits, group_size, damp, block_size, act_order, static_groups):
    check_bits_group(bits, group_size)
    if act_order and not static_groups:
        raise UserError("gptq: act_order=True needs static_groups=True (groups are stored as consecutive "
                     "columns, so their parameters must be fixed before the columns are permuted)")
    W = w.detach().float().clone()
    H = H.detach().float().clone()
    out, columns = W.shape
    assert H.shape == (columns, columns), f"H has shape {tuple(H.shape)}, expected ({columns}, {columns})"
    gs = effective_group_size(columns, group_size)
    n_groups = len(group_sizes(columns, group_size))
    scales = torch.zeros(out, n_groups)
    biases = torch.zeros(out, n_groups)

    dead = torch.diag(H) == 0  # inputs that were always zero: any weight is as good, use 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if static_groups:  # parameters from the whole (unpermuted) weights before the sweep
        for g in range(n_groups):
            scales[:, g], biases[:, g] = _find_params(W[:, g * gs:(g + 1) * gs], bits)

    perm = None
    if act_order:  # quantize columns with large activations first
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    Hinv = _cholesky_inverse_upper(H, damp)  # [in, in], upper triangular
    Q = torch.zeros_like(W)  # codes, in sweep order

    scale = bias = None
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # [out, count]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            w_col = W1[:, i]
            d = Hinv1[i, i]
            if static_groups:
                g = (perm[i1 + i].item() if act_order else i1 + i) // gs
                scale, bias = scales[:, g], biases[:, g]
            elif (i1 + i) % gs == 0:  # a group starts: parameters from W as the last finished block left it
                g = (i1 + i) // gs
                scale, bias = _find_params(W[:, i1 + i:i1 + i + gs], bits)
                scales[:, g], biases[:, g] = scale, bias
            q = _round(w_col, scale, bias, bits)
            Q1[:, i] = q
            err1 = (w_col - (scale * q + bias)) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))  # [out, count-i]
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])  # lazy update of the columns after this block

    if act_order:
        Q = Q[:, invperm]
    return Q.to(torch.uint8), scales, biases


# -----------------------------------------------------------------------------
# QuantLinear

class QuantLinear(nn.Module):
    """A frozen quantized linear: y = x @ w~^T (+ bias), w~ = scales * codes + biases per group.
    Buffers: qweight uint8 [out, ceil(in*bits/8)] (packed, layout above), scales and biases
    f32 [out, n_groups], optional bias [out]. The matmul is kernels.qmatmul."""

    def __init__(self, in_features, out_features, bits, group_size, bias=False):
        super().__init__()
        check_bits_group(bits, group_size)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = effective_group_size(in_features, group_size)
        self.n_groups = len(group_sizes(in_features, group_size))
        self.impl = "auto"       # kernels.qmatmul's impl
        self.kernel_cache = {}   # code layouts the kernels derive from qweight (kernels._cached)
        self.ggml_type = None    # the GGUF block type the codes were read from (export.py writes it back)
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, self.n_groups))
        self.register_buffer("biases", torch.zeros(out_features, self.n_groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_codes(cls, q, scales, biases, bits, group_size, bias=None):
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None)
        assert scales.shape == biases.shape == (out_features, layer.n_groups), (
            f"scales {tuple(scales.shape)} / biases {tuple(biases.shape)} do not match codes {tuple(q.shape)} "
            f"with group_size={group_size}")
        layer.qweight.copy_(pack(q, bits))
        layer.scales.copy_(scales)
        layer.biases.copy_(biases)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear, bits, group_size):
        """Min-max RTN of an nn.Linear."""
        q, scales, biases = quantize(linear.weight, bits, group_size)
        return cls.from_codes(q, scales, biases, bits, group_size, bias=linear.bias)

    def codes(self):
        return unpack(self.qweight, self.bits, self.in_features)  # [out, in] uint8

    def dequantize_weight(self, dtype=torch.float32):
        return dequantize(self.codes(), self.scales, self.biases, self.group_size).to(dtype)

    def forward(self, x):
        return kernels.qmatmul(x, self, impl=self.impl)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


# -----------------------------------------------------------------------------
# whole-model quantization

def _set_module(root, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _targets(model):
    """Every nn.Linear but the output head."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] != "lm_head"]


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted activations are captured."""


# Within a block, GPTQ goes "true-sequential": each stage's Hessian is collected from inputs
# computed with the earlier stages already quantized. Linears of one stage read the same input.
STAGES = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def _block_stages(block):
    linears = {name for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    stages = [[n for n in stage if n in linears] for stage in STAGES]
    known = {n for stage in STAGES for n in stage}
    stages += [[n] for n in sorted(linears - known)]  # anything unexpected: on its own, after the rest
    return [s for s in stages if s]


@torch.no_grad()
def _capture_block_inputs(model, calib, batch_size):
    """Run the model up to layers[0] for each batch of calibration ids; returns a list of
    (x [b, T, dim], other positional args, kwargs) as layers[0] received them."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args[0], args[1:], kwargs))
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in range(0, calib.shape[0], batch_size):
            try:
                model(calib[b:b + batch_size])
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


class _Replay(nn.Module):
    """Stands in for a finished submodule (all its linears quantized): returns the outputs it gave
    in an earlier pass, one per calibration batch, instead of computing them again."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.i = outputs, 0

    def forward(self, *args, **kwargs):
        self.i += 1
        return self.outputs[self.i - 1]


def _block_pass(block, inputs, done, cache, pre_hook=None):
    """One pass of the calibration batches through a block. `pre_hook` (module, hook) may raise _Stop
    to end each batch early. A submodule whose linears are all in `done` (or a done linear) gives the
    same output in every later pass: it is recorded once (cache) and replayed after that (the outermost
    cached one), so the four stages of a block cost about one forward. Returns the block's outputs."""
    outs, handles, recording, replaced = [], [], {}, {}
    for name, mod in list(block.named_modules()):
        if not name or any(name.startswith(r + ".") for r in replaced):
            continue
        linears = [f"{name}.{n}".rstrip(".") for n, m in mod.named_modules() if isinstance(m, nn.Linear)]
        if not linears or not all(n in done for n in linears):
            continue
        if name in cache:
            replaced[name] = mod
            _set_module(block, name, _Replay(cache[name]))
        else:
            recording[name] = []
            handles.append(mod.register_forward_hook(lambda m, a, y, rec=recording[name]: rec.append(y)))
    if pre_hook is not None:
        handles.append(pre_hook[0].register_forward_pre_hook(pre_hook[1]))
    try:
        for x, args, kwargs in inputs:
            try:
                y = block(x, *args, **kwargs)
                outs.append(y[0] if isinstance(y, tuple) else y)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        for name, child in replaced.items():
            _set_module(block, name, child)
    cache.update({name: rec for name, rec in recording.items() if len(rec) == len(inputs)})
    return outs


@torch.no_grad()
def _gptq_block(block, inputs, bits, group_size, **gptq_kw):
    """GPTQ one block in place, stage by stage; returns the quantized block's outputs for `inputs`.
    While the block is calibrated, a quantized linear stays an nn.Linear holding w~ (its dequantized
    weights): later stages see quantized outputs at plain matmul speed. QuantLinears replace them at the end."""
    done, cache = {}, {}
    for stage in _block_stages(block):
        first = block.get_submodule(stage[0])
        H = torch.zeros(first.in_features, first.in_features)
        n = 0

        def hook(module, args):
            nonlocal n
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # [b*T, in]
            H.addmm_(x.T, x)  # H += X^T X
            n += x.shape[0]
            raise _Stop  # the rest of the block is not needed for this stage

        _block_pass(block, inputs, done, cache, pre_hook=(first, hook))
        H *= 2 / n  # H = 2/n X X^T, as in the reference (any positive multiple would do)

        # Rows are independent in GPTQ, so linears that share an input (q/k/v, gate/up)
        # are quantized together as one stacked weight.
        layers = [block.get_submodule(name) for name in stage]
        W = torch.cat([m.weight for m in layers], dim=0)  # [sum(out), in]
        q, scales, biases = gptq(W, H, bits, group_size, **gptq_kw)
        row = 0
        for name, m in zip(stage, layers):
            rows = slice(row, row + m.out_features)
            row += m.out_features
            done[name] = (q[rows], scales[rows], biases[rows], m)
            m.weight.copy_(dequantize(q[rows], scales[rows], biases[rows], group_size))

    outs = _block_pass(block, inputs, done, cache)  # the quantized block's outputs feed the next block
    for name, (q, scales, biases, m) in done.items():
        ql = QuantLinear.from_codes(q, scales, biases, bits, group_size, bias=m.bias)
        _set_module(block, name, ql.to(m.weight.device))
    return outs


@torch.no_grad()
def quantize_model(model, bits, group_size, method="rtn", calib=None, batch_size=8, progress=True, **gptq_kw):
    """In place: every nn.Linear but lm_head becomes a QuantLinear. method "rtn" (min-max) or
    "gptq" (calib: LongTensor [n, T] of token ids; gptq_kw go to `gptq`). Returns the model."""
    check_bits_group(bits, group_size)
    if method not in ("rtn", "gptq"):
        raise UserError(f"quantization method {method!r} is unknown; use 'rtn' or 'gptq'")
    if method == "rtn":
        for name, m in _targets(model):
            _set_module(model, name, QuantLinear.from_linear(m, bits, group_size).to(m.weight.device))
    else:
        if calib is None or calib.dim() != 2 or calib.numel() == 0:
            raise UserError("gptq needs calibration token ids: a LongTensor [n, T] (quant.py: --calib FILE)")
        from tqdm import tqdm
        was_training = model.training
        model.eval()
        inputs = _capture_block_inputs(model, calib, batch_size)
        for block in tqdm(model.layers, desc=f"gptq {bits}-bit g{group_size}", disable=not progress):
            outs = _gptq_block(block, inputs, bits, group_size, **gptq_kw)
            inputs = [(y, args, kwargs) for y, (x, args, kwargs) in zip(outs, inputs)]
        model.train(was_training)
        for name, m in _targets(model):  # linears outside the blocks (none in LLaMA): RTN
            _set_module(model, name, QuantLinear.from_linear(m, bits, group_size).to(m.weight.device))
    model.quantization = {"bits": bits, "group_size": group_size, "method": method, "format": "affine"}
    return model
