"""Fold QA-LoRA adapters into the quantized base, exactly; and the plain-LoRA baseline's lossy merge.

QA-LoRA's adapter adds s * B @ A @ (c * pool(x)). pool averages each quantization group and c_g is
the adapter's pool scale (qalora.py: 1 for the mean, size(g) for the sum, ...), so for row o and group
g the adapter contributes s * c_g * (B @ A)[o, g] / size(g) * sum_{i in g} x_i: a per-(row, group)
constant times the group's input sum, which is exactly what a bias of the affine quantizer does:

    biases'[o, g] = biases[o, g] + s * c_g * (B @ A)[o, g] / size(g)     (float64, then cast)

Codes and scales are untouched, so the merged model is again a pure `bits`-bit model (export.py writes
it to GGUF and MLX). Plain LoRA's B @ A is dense: merging it means dequantize, add, and quantize again
(RTN or GPTQ), which is lossy.
"""
import torch
import torch.nn as nn

import quant
from cli import UserError
from qalora import QALoRALinear, adapter_layers


@torch.no_grad()
def merge_adapters(model):
    """In place: every QALoRALinear becomes its base QuantLinear with the adapter folded into biases."""
    for name, layer in adapter_layers(model):
        if not isinstance(layer, QALoRALinear):
            raise UserError(f"{name} is a plain LoRA adapter: it cannot be folded into the quantized "
                            f"weights exactly; use merge_lora_baseline (dequantize, merge, requantize)")
        base = layer.base
        sizes = torch.tensor(quant.group_sizes(base.in_features, base.group_size), dtype=torch.float64)
        delta = layer.scaling * (layer.lora_B.weight.double() @ layer.lora_A.weight.double())  # [out, n_groups]
        base.biases.copy_((base.biases.double() + delta * layer.pool_c.double() / sizes).to(base.biases.dtype))
        model.set_submodule(name, base)
    model.__dict__.pop("adapter_config", None)
    return model


@torch.no_grad()
def merge_lora_baseline(model, bits, group_size, method="rtn", calib=None):
    """The QLoRA baseline: each plain LoRALinear -> float nn.Linear(W~ + s * B @ A), then quantize_model
    (RTN, or GPTQ with calibration ids [n, T]). Error comes from requantizing the merged weight."""
    for name, layer in adapter_layers(model):
        if isinstance(layer, QALoRALinear):
            raise UserError(f"{name} is a QA-LoRA adapter: merge it exactly with merge_adapters")
        base = layer.base
        w = base.dequantize_weight(torch.float64) if isinstance(base, quant.QuantLinear) else base.weight.double()
        w = w + layer.scaling * (layer.lora_B.weight.double() @ layer.lora_A.weight.double())  # [out, in]
        dtype = base.scales.dtype if isinstance(base, quant.QuantLinear) else base.weight.dtype
        lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype)
        lin.weight.copy_(w.to(dtype))
        if base.bias is not None:
            lin.bias.copy_(base.bias)
        model.set_submodule(name, lin)
    model.__dict__.pop("adapter_config", None)
    return quant.quantize_model(model, bits, group_size, method=method, calib=calib)
