"""The exact merge, the baseline's lossy merge, and the GGUF / MLX exports (decoded independently here)."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import quant
from merge import export_gguf, export_mlx, merge_adapters, merge_lora_baseline
from model import Transformer, UserError
from qalora import QALoRALinear, add_adapters, adapter_layers, save_adapters

ROOT = Path(__file__).resolve().parents[1]


def quantized_model(tiny_args, bits=4, group_size=32, seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**kw)).eval()
    return quant.quantize_model(model, bits, group_size)


def randomize_B(model, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


def quant_state(model):
    return {n: (m.qweight.clone(), m.scales.clone(), m.biases.clone())
            for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------------
# the exact merge

# dim 80 / hidden 200: group 16 -> 5 and 12 + a short 8; 32 -> 2 + 16 and 6 + 8; 64 -> 1 + 16 and 3 + 8;
# 128 -> the whole 80-wide row, and 128 + a short 72.
@pytest.mark.filterwarnings("ignore:rank 2 exceeds")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128])
def test_merge_is_exact(tiny_args, bits, group_size):
    model = quantized_model(tiny_args, bits, group_size, dim=80, hidden_dim=200, n_heads=4, n_kv_heads=2)
    before = quant_state(model)
    add_adapters(model, rank=2, alpha=4.0)
    randomize_B(model)
    ids = torch.randint(0, model.args.vocab_size, (2, 12))
    with torch.no_grad():
        unmerged = model(ids)
        merge_adapters(model)
        merged = model(ids)
    assert rel_err(merged, unmerged) < 1e-5, f"bits={bits} g={group_size}: {rel_err(merged, unmerged):.2e}"
    after = quant_state(model)
    assert before.keys() == after.keys()
    for n in before:
        assert torch.equal(before[n][0], after[n][0]) and torch.equal(before[n][1], after[n][1]), n  # codes, scales
    assert any(not torch.equal(before[n][2], after[n][2]) for n in before)                    # biases moved
    assert not adapter_layers(model) and not any("lora" in n for n, _ in model.named_parameters())
    assert not hasattr(model, "adapter_config")


def test_merge_formula_per_group(tiny_args):
    """biases'[:, g] = biases[:, g] + s * (B @ A)[:, g] / size(g), with the short last group's own size."""
    model = quantized_model(tiny_args, 4, 64, dim=80, hidden_dim=200)
    add_adapters(model, rank=2, alpha=3.0, targets=("down_proj",))
    randomize_B(model)
    layer = model.layers[0].mlp.down_proj
    expect = layer.base.biases.double() + 1.5 * (layer.lora_B.weight.double() @ layer.lora_A.weight.double()) \
        / torch.tensor([64.0, 64.0, 64.0, 8.0], dtype=torch.float64)
    merge_adapters(model)
    torch.testing.assert_close(model.layers[0].mlp.down_proj.biases, expect.float(), rtol=0, atol=0)


def test_baseline_merge_is_not_exact(tiny_args, capsys):
    """Plain LoRA + requantization (RTN and GPTQ) loses what QA-LoRA's merge keeps."""
    base = quantized_model(tiny_args, 4, 32, dim=128, hidden_dim=256)
    ids = torch.randint(0, base.args.vocab_size, (4, 16))
    errors = {}
    qa = copy.deepcopy(base)
    add_adapters(qa, rank=4, alpha=8.0)
    randomize_B(qa, std=0.05)
    for method in ("rtn", "gptq"):
        lora = copy.deepcopy(base)
        add_adapters(lora, rank=4, alpha=8.0, method="lora")
        randomize_B(lora, std=0.05)
        with torch.no_grad():
            ref = lora(ids)
            merge_lora_baseline(lora, 4, 32, method, calib=torch.randint(0, base.args.vocab_size, (8, 32)))
            errors[f"lora+{method}"] = rel_err(lora(ids), ref)
        assert not adapter_layers(lora) and all(
            isinstance(m, quant.QuantLinear) for n, m in lora.named_modules() if n.endswith("_proj"))
    with torch.no_grad():
        ref = qa(ids)
        merge_adapters(qa)
        errors["qalora"] = rel_err(qa(ids), ref)
    with capsys.disabled():
        print("\nmerge error, max |logit diff| / max |logit|: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert errors["qalora"] < 1e-6
    for method in ("rtn", "gptq"):
        assert errors[f"lora+{method}"] > 1e-3 and errors[f"lora+{method}"] > 1000 * errors["qalora"]


def test_merge_refuses_the_wrong_kind(tiny_args):
    lora = quantized_model(tiny_args)
    add_adapters(lora, rank=2, alpha=2.0, method="lora")
    with pytest.raises(UserError, match="merge_lora_baseline"):
        merge_adapters(lora)
    qa = quantized_model(tiny_args)
    add_adapters(qa, rank=2, alpha=2.0)
    with pytest.raises(UserError, match="merge_adapters"):
        merge_lora_baseline(qa, 4, 32)
    with pytest.raises(UserError, match="merge"):
        export_gguf(qa, "/nonexistent/x.gguf")
