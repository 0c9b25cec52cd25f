"""
Dequant-matmul kernels: y = x @ w~^T (+ bias) for a quant.QuantLinear, where

    w~[o, i] = scales[o, g(i)] * q[o, i] + biases[o, g(i)]      (g(i) = i // group_size)

One dispatch function, `qmatmul(x, layer, impl)`, with explicit choices:

- "reference": unpack, dequantize, matmul. The readable definition; everything else is tested against it.

More paths follow below the reference. `pool_groups` is the one group-mean pooling shared by the
kernels (the bias term needs per-group input sums) and by QA-LoRA's adapter (its input is the pool).
"""
import torch

IMPLS = ("reference", "auto")


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
# dispatch

def qmatmul(x, layer, impl="auto", pooled=None):
    """y [..., out] = x [..., in] @ w~^T (+ layer.bias). `pooled` (optional) is pool_groups(x, group_size),
    computed once by QA-LoRA's adapter and shared with the bias term of the grouped paths."""
    assert x.shape[-1] == layer.in_features, (
        f"qmatmul: input width {x.shape[-1]} does not match layer in_features={layer.in_features}")
    if impl in ("reference", "auto"):
        return reference(x, layer)
    raise ValueError(f"qmatmul: unknown impl {impl!r}; use one of {IMPLS}")
