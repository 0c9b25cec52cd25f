"""QA-LoRA adapters: the pooled update is a group-constant dense update, wrapping/freezing, save/load."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import quant
from kernels import pool_groups
from model import Transformer, UserError
from qalora import DEFAULT_POOL_SCALE, LoRALinear, QALoRALinear, add_adapters, adapter_layers, load_adapters, save_adapters

from conftest import quantized_model, randomize_B  # noqa: E402


def expand_columns(A, in_features, group_size):
    """A [r, n_groups] -> dense [r, in]: each column repeated over its group and divided by its width."""
    widths = torch.tensor(quant.group_sizes(in_features, group_size))
    return (A / widths).repeat_interleave(widths, dim=1)


@pytest.mark.parametrize("in_features,group_size", [(64, 16), (80, 32), (200, 64), (200, 128), (576, 128), (40, -1)])
def test_pooling_is_a_group_constant_dense_update(in_features, group_size):
    x = torch.randn(3, 5, in_features, dtype=torch.float64)
    n_groups = len(quant.group_sizes(in_features, group_size))
    A = torch.randn(4, n_groups, dtype=torch.float64)
    pooled = pool_groups(x, group_size)                                   # [3, 5, n_groups]
    assert pooled.shape == (3, 5, n_groups)
    dense = x @ expand_columns(A, in_features, group_size).T
    torch.testing.assert_close(pooled @ A.T, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits,group_size,in_features", [(4, 32, 80), (3, 16, 72), (2, 64, 200), (8, 128, 200)])
def test_qalora_linear_equals_dense_reference(bits, group_size, in_features):
    w = torch.randn(24, in_features)
    base = quant.QuantLinear.from_codes(*quant.quantize(w, bits, group_size), bits, group_size)
    layer = QALoRALinear(base, rank=3, alpha=6.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 7, in_features)
    dense = base.dequantize_weight().double() + layer.scaling * (
        layer.lora_B.weight.double() @ expand_columns(layer.lora_A.weight.double(), in_features, base.group_size))
    ref = x.double() @ dense.T
    assert ((layer(x).double() - ref).abs().max() / ref.abs().max()).item() < 1e-5   # float32 accuracy
    assert layer.lora_A.weight.shape == (3, base.n_groups) and layer.scaling == 2.0


@pytest.mark.parametrize("impl", ["reference", "eager", "compiled"])
def test_gradients_match_the_dense_reference(impl):
    """The pool is shared with the kernel's bias term: input and adapter gradients must still be exact."""
    w = torch.randn(48, 200)
    base = quant.QuantLinear.from_codes(*quant.quantize(w, 4, 64), 4, 64)
    base.impl = impl
    layer = QALoRALinear(base, rank=3, alpha=6.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 200, requires_grad=True)
    gy = torch.randn(2, 5, 48)
    (layer(x) * gy).sum().backward()
    xd = x.detach().double().requires_grad_()
    A, B = (p.detach().double().requires_grad_() for p in (layer.lora_A.weight, layer.lora_B.weight))
    dense = base.dequantize_weight().double() + layer.scaling * B @ expand_columns(A, 200, 64)
    ((xd @ dense.T) * gy.double()).sum().backward()
    for got, want in ((x.grad, xd.grad), (layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad)):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_lora_linear_equals_dense_reference():
    w = torch.randn(24, 80)
    base = quant.QuantLinear.from_codes(*quant.quantize(w, 4, 32), 4, 32)
    layer = LoRALinear(base, rank=3, alpha=3.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 80)
    dense = base.dequantize_weight() + layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(layer(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.weight.shape == (3, 80)


def test_init_dropout_and_sharing_do_not_touch_the_base():
    base = quant.QuantLinear.from_codes(*quant.quantize(torch.randn(16, 64), 4, 32), 4, 32)
    layer = QALoRALinear(base, rank=2, alpha=4.0, dropout=0.5)
    x = torch.randn(4, 64)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    layer.train()
    torch.testing.assert_close(layer(x), base(x))  # B = 0: the identity update, dropout or not
    nn.init.normal_(layer.lora_B.weight)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    torch.manual_seed(3)
    y_train = layer(x)
    assert not torch.allclose(y_train, y_eval)     # dropout acts on the adapter's input in training
    layer.lora_B.weight.data.zero_()
    torch.testing.assert_close(layer(x), base(x))  # the base never sees dropout


def test_add_adapters_wraps_targets_freezes_the_rest(tiny_args):
    model = quantized_model(tiny_args)
    n_before = sum(p.numel() for p in model.parameters())
    params = add_adapters(model, rank=2, alpha=4.0)
    layers = adapter_layers(model)
    assert len(layers) == 7 * model.args.n_layers
    assert all(isinstance(m, QALoRALinear) for _, m in layers)
    assert isinstance(model.lm_head, nn.Linear)                       # never the output head
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params} and len(params) == 2 * len(layers)
    assert sum(p.numel() for p in model.parameters()) - n_before == sum(p.numel() for p in params)
    ids = torch.randint(0, model.args.vocab_size, (2, 9))
    model(ids).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in params)
    assert all(torch.count_nonzero(m.lora_B.weight.grad) > 0 for _, m in layers)  # B = 0 still learns
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with pytest.raises(UserError, match="already has adapters"):
        add_adapters(model, rank=2, alpha=4.0)


def test_add_adapters_targets_and_refusals(tiny_args):
    model = quantized_model(tiny_args)
    add_adapters(model, rank=2, alpha=2.0, targets=("q_proj", "v_proj"))
    assert [n.split(".")[-1] for n, _ in adapter_layers(model)] == ["q_proj", "v_proj"] * model.args.n_layers
    float_model = Transformer(tiny_args()).eval()
    with pytest.raises(UserError, match="quantize"):
        add_adapters(float_model, rank=2, alpha=2.0)
    lora = add_adapters(Transformer(tiny_args()).eval(), rank=2, alpha=2.0, method="lora")  # LoRA on float: fine
    assert len(lora) == 2 * 7 * tiny_args().n_layers
    with pytest.raises(UserError, match="method"):
        add_adapters(quantized_model(tiny_args), rank=2, alpha=2.0, method="dora")


def test_rank_above_pooled_width_warns(tiny_args):
    model = quantized_model(tiny_args, group_size=32)  # dim 64 -> 2 groups
    with pytest.warns(UserWarning, match="pooled width 2"):
        add_adapters(model, rank=4, alpha=4.0)


@pytest.mark.parametrize("pool_scale,c", [("mean", [1.0, 1.0, 1.0]), ("sum", [32.0, 32.0, 16.0]),
                                          ("sqrt", [32 ** 0.5, 32 ** 0.5, 4.0]), ("ngroups", [3.0, 3.0, 3.0])])
def test_pool_scale_multiplies_the_adapter_input_only(pool_scale, c):
    """The adapter reads c_g * mean_g(x) (a short last group of 16 uses its own width); the base does not."""
    w = torch.randn(12, 80)
    base = quant.QuantLinear.from_codes(*quant.quantize(w, 4, 32), 4, 32)
    layer = QALoRALinear(base, rank=2, alpha=4.0, pool_scale=pool_scale)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 80, dtype=torch.float64)
    means = torch.stack([x[:, :32].mean(1), x[:, 32:64].mean(1), x[:, 64:].mean(1)], dim=1)   # [5, 3]
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    ref = x @ base.dequantize_weight().double().T + 2.0 * (means * torch.tensor(c, dtype=torch.float64)) @ A.T @ B.T
    got = layer(x.float()).double()
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_xavier_init_and_bad_names(tiny_args):
    torch.manual_seed(0)
    layer = QALoRALinear(quant.QuantLinear.from_codes(*quant.quantize(torch.randn(8, 512), 4, 16), 4, 16),
                         rank=4, alpha=4.0, init="xavier")
    bound = (6 / (32 + 4)) ** 0.5                                # xavier_uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound
    with pytest.raises(UserError, match="pool scale"):
        add_adapters(quantized_model(tiny_args), rank=2, alpha=2.0, pool_scale="median")
    with pytest.raises(UserError, match="init"):
        add_adapters(quantized_model(tiny_args), rank=2, alpha=2.0, init="orthogonal")


@pytest.mark.parametrize("method,pool_scale", [("qalora", "mean"), ("qalora", "sum"), ("qalora", "sqrt"),
                                               ("qalora", "ngroups"), ("lora", None)])
def test_save_load_round_trip(tiny_args, tmp_path, method, pool_scale):
    base = quantized_model(tiny_args, group_size=16, dim=80)     # 80 = 5 groups of 16: every c_g differs from 1
    model = copy.deepcopy(base)
    add_adapters(model, rank=3, alpha=6.0, dropout=0.1, method=method, pool_scale=pool_scale or "mean")
    randomize_B(model)
    save_adapters(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["method"] == method and meta["rank"] == 3 and meta["alpha"] == 6.0 and meta["dropout"] == 0.1
    assert meta["pool_scale"] == pool_scale and meta["init"] == "kaiming"
    assert meta["bits"] == 4 and meta["group_size"] == 16 and len(meta["fingerprint"]) == 64
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter.json", "adapter.safetensors"]
    fresh = copy.deepcopy(base)
    load_adapters(fresh, tmp_path / "ad")
    ids = torch.randint(0, model.args.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
    if method == "qalora":
        assert {m.pool_scale for _, m in adapter_layers(fresh)} == {pool_scale}
        other = copy.deepcopy(base)                                 # an adapter of another pool scale is refused
        add_adapters(other, rank=3, alpha=6.0, pool_scale="sum" if pool_scale != "sum" else "mean")
        with pytest.raises(UserError, match="pool_scale"):
            load_adapters(other, tmp_path / "ad")


def test_adapter_json_without_pool_scale_loads_as_mean(tiny_args, tmp_path):
    """adapter.json files written before pool_scale existed hold a mean-pooled adapter."""
    base = quantized_model(tiny_args, group_size=16, dim=80)
    model = copy.deepcopy(base)
    add_adapters(model, rank=3, alpha=6.0, pool_scale="mean")  # what old files hold
    randomize_B(model)
    save_adapters(model, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter.json"
    meta = json.loads(path.read_text())
    del meta["pool_scale"], meta["init"]
    path.write_text(json.dumps(meta))
    fresh = copy.deepcopy(base)
    load_adapters(fresh, tmp_path / "ad")
    assert fresh.adapter_config["pool_scale"] == "mean" != DEFAULT_POOL_SCALE   # not today's default
    ids = torch.randint(0, model.args.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


def test_load_refuses_other_base_rank_and_merged(tiny_args, tmp_path):
    import merge
    base = quantized_model(tiny_args, group_size=16)
    model = copy.deepcopy(base)
    add_adapters(model, rank=2, alpha=4.0)
    randomize_B(model)
    save_adapters(model, tmp_path / "ad")
    with pytest.raises(UserError, match="another base"):
        load_adapters(quantized_model(tiny_args, group_size=16, seed=5), tmp_path / "ad")  # other weights
    with pytest.raises(UserError, match="another base"):
        load_adapters(quantized_model(tiny_args, group_size=32), tmp_path / "ad")   # other group size
    other_rank = copy.deepcopy(base)
    add_adapters(other_rank, rank=4, alpha=4.0)
    with pytest.raises(UserError, match="rank"):
        load_adapters(other_rank, tmp_path / "ad")
    merge.merge_adapters(model)                                                       # biases changed
    with pytest.raises(UserError, match="another base"):
        load_adapters(model, tmp_path / "ad")
    with pytest.raises(UserError, match="adapter.json"):
        load_adapters(copy.deepcopy(base), tmp_path / "nowhere")
