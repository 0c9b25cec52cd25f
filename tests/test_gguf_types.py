"""Fine-tuning the GGUF a user already has: a mixed file (Q4_0, Q5_0, Q8_0, Q5_1, Q4_1 and the K types, as a
Q4_K_M holds them) loads as codes exactly, trains, merges exactly layer by layer, and exports back with the
codes kept: Q4_0/Q4_K -> Q4_1, Q5_0/Q5_K -> Q5_1, Q5_1 keeps its codes and d, offsetless types (Q8_0, Q6_K,
Q3_K, Q2_K) are copied byte for byte (--offsetless skip) or re-encoded as Q8_0 only when asked. The reference
decoder is gguf.quants.dequantize, which this project did not write."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT, GGUFReader, GGUFWriter, GGUFValueType, quants

import quant
from conftest import ROOT, randomize_B
from export import export_gguf, gguf_plan
from gguf_codec import decode_blocks, permute_qk
from merge import merge_adapters
from model import ModelArgs, Transformer
from qalora import add_adapters, adapter_layers, load_adapters, save_adapters
from test_gguf_codec import random_blocks

# what each linear of the 2-layer test file is stored as (the rest stay Q4_1)
TYPES = {"blk.0.attn_q.weight": QT.Q4_0, "blk.0.attn_k.weight": QT.Q5_0, "blk.0.attn_v.weight": QT.Q8_0,
         "blk.0.attn_output.weight": QT.Q4_K, "blk.0.ffn_gate.weight": QT.Q5_K, "blk.0.ffn_up.weight": QT.Q6_K,
         "blk.0.ffn_down.weight": QT.Q5_1, "blk.1.attn_q.weight": QT.Q2_K, "blk.1.attn_k.weight": QT.Q3_K}
K_TYPES = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)  # gguf.quants cannot quantize these: random blocks
OFFSETLESS = (QT.Q8_0, QT.Q6_K, QT.Q3_K, QT.Q2_K)
GGUF_OF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def gguf_name(name):
    layer, _, proj = name.split(".")[1:4]
    return f"blk.{layer}.{GGUF_OF[proj]}.weight"


def retype(src, dst, types):
    """Copy GGUF `src` to `dst` with the tensors in `types` stored as those types: the legacy types quantized
    from the source's weights by gguf.quants, the K types as random blocks of moderate size."""
    reader = GGUFReader(str(src))
    writer = GGUFWriter(str(dst), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for i, t in enumerate(reader.tensors):
        kind = types.get(t.name)
        if kind is None:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            continue
        w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
        rows, cols = w.shape
        data = random_blocks(kind, rows, cols, seed=i, scale=2e-3) if kind in K_TYPES else quants.quantize(w, kind)
        writer.add_tensor(t.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory, tiny_tokenizer):
    """A random 2-layer LLaMA (rows of 256 and 512, as the K types need) with the test tokenizer, exported as
    Q4_1, then retyped per TYPES."""
    d = tmp_path_factory.mktemp("mixed")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512,
                                  vocab_size=tiny_tokenizer.vocab_size, max_seq_len=256)).eval()
    model.save_pretrained(d / "float", tokenizer=tiny_tokenizer)
    model = Transformer.from_pretrained(d / "float")
    quant.quantize_model(model, 4, 32)
    return retype(export_gguf(model, d / "q4_1.gguf"), d / "mixed.gguf", TYPES)


def test_mixed_file_loads_as_codes_exactly(mixed_gguf):
    model = Transformer.from_pretrained(mixed_gguf, keep_quantized=True)
    src = {t.name: t for t in GGUFReader(str(mixed_gguf)).tensors}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)]
    assert len(layers) == 14
    for name, layer in layers:
        t = src[gguf_name(name)]
        assert layer.ggml_type == t.tensor_type.name, name
        ref = torch.from_numpy(np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32))
        h = model.args.n_heads if "q_proj" in name else model.args.n_kv_heads if "k_proj" in name else None
        if h:
            ref = permute_qk(ref, h, inverse=True)
        assert torch.equal(layer.dequantize_weight().float(), ref), name   # value-exact (-0.0 == +0.0)
        assert layer.group_size == (16 if t.tensor_type in (QT.Q2_K, QT.Q3_K, QT.Q6_K) else 32), name
    assert {m.bits for _, m in layers} == {2, 3, 4, 5, 6, 8}
    ids = torch.randint(0, model.args.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


@pytest.mark.filterwarnings("ignore:rank")
def test_mixed_merge_is_exact_per_layer(mixed_gguf):
    """Every layer pools over its own block (16 or 32), and the merge folds into each its own biases."""
    model = Transformer.from_pretrained(mixed_gguf, keep_quantized=True)
    add_adapters(model, rank=4, alpha=8.0)
    for _, a in adapter_layers(model):
        assert a.base.n_groups == a.base.in_features // a.base.group_size
    randomize_B(model)
    before = {n: (a.base.codes().clone(), a.base.dequantize_weight().clone()) for n, a in adapter_layers(model)}
    ids = torch.randint(0, model.args.vocab_size, (2, 12))
    with torch.no_grad():
        unmerged = model(ids)
        merge_adapters(model)
        merged = model(ids)
    assert ((merged - unmerged).abs().max() / unmerged.abs().max()).item() < 1e-5
    for n, m in model.named_modules():
        if n in before:
            codes, w0 = before[n]
            assert torch.equal(m.codes(), codes), n
            dw = (m.dequantize_weight() - w0).view(m.out_features, -1, m.group_size)   # constant per (row, group)
            assert (dw - dw[..., :1]).abs().max() <= 1e-5 * w0.abs().max(), n


def trained_and_merged(path, offsetless):
    """What train.py does: adapters everywhere except (with skip) the offsetless layers; B random; merged."""
    from export import offsetless_layers
    model = Transformer.from_pretrained(path, keep_quantized=True)
    exclude = list(offsetless_layers(model)) if offsetless == "skip" else []
    add_adapters(model, rank=4, alpha=8.0, exclude=tuple(exclude))
    randomize_B(model)
    return merge_adapters(model), exclude


@pytest.mark.filterwarnings("ignore:rank")
def test_export_keeps_codes_and_copies_offsetless_layers(mixed_gguf, tmp_path):
    model, skipped = trained_and_merged(mixed_gguf, "skip")
    assert sorted(gguf_name(n) for n in skipped) == sorted(k for k, v in TYPES.items() if v in OFFSETLESS)
    plan = gguf_plan(model)
    out = export_gguf(model, tmp_path / "merged.gguf")
    src = {t.name: t for t in GGUFReader(str(mixed_gguf)).tensors}
    got = {t.name: t for t in GGUFReader(str(out)).tensors}
    assert list(got) == list(src)
    assert out.stat().st_size <= 1.15 * mixed_gguf.stat().st_size
    want = {QT.Q4_0: QT.Q4_1, QT.Q4_K: QT.Q4_1, QT.Q5_0: QT.Q5_1, QT.Q5_K: QT.Q5_1, QT.Q5_1: QT.Q5_1,
            QT.Q4_1: QT.Q4_1}
    for name, t in src.items():
        g = got[name]
        if t.tensor_type in OFFSETLESS or not name.endswith(tuple(f"{v}.weight" for v in GGUF_OF.values())):
            assert g.tensor_type == t.tensor_type and g.data.tobytes() == t.data.tobytes(), name  # byte for byte
            continue
        assert g.tensor_type == want[t.tensor_type], name
        n_cols = int(t.shape[0])
        c0, s0, b0, *_ = decode_blocks(t.tensor_type, t.data, n_cols)
        c1, s1, b1, *_ = decode_blocks(g.tensor_type, g.data, n_cols)
        assert torch.equal(c0, c1), name                                          # codes identical
        rep = s0.repeat_interleave(2, dim=1) if s0.shape[1] * 2 == s1.shape[1] else s0
        assert torch.equal(s1, rep.half().float()), name                          # scales: f16 rounding only
        if t.tensor_type in (QT.Q4_1, QT.Q5_1):                                   # d byte-identical, only m moves
            assert torch.equal(s1, s0), name
        w0 = torch.from_numpy(np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32))
        w1 = torch.from_numpy(np.asarray(quants.dequantize(g.data, g.tensor_type), np.float32))
        dw = (w1 - w0).view(w0.shape[0], -1, 32)           # the merge moved each (row, block) by a constant,
        spread = (dw - dw[..., :1]).abs().max()            # plus f16 rounding of the scale
        assert spread <= 2e-3 * w0.abs().max(), (name, spread.item())
    assert set(plan.values()) <= {"Q4_1", "Q5_1", "copy"}
    reloaded = Transformer.from_pretrained(out, keep_quantized=True)
    ids = torch.randint(0, model.args.vocab_size, (2, 12))
    with torch.no_grad():
        a, b = reloaded(ids), model(ids)
    assert ((a - b).abs().max() / b.abs().max()).item() < 2e-2           # f16 scales and biases only


@pytest.mark.filterwarnings("ignore:rank")
def test_offsetless_layers_refused_unless_requantized(mixed_gguf, tmp_path):
    from cli import UserError
    model, _ = trained_and_merged(mixed_gguf, "requantize")
    with pytest.raises(UserError, match="--requantize"):
        export_gguf(model, tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())
    report = []
    out = export_gguf(model, tmp_path / "b.gguf", requantize=True, report=report)
    types = {t.name: t.tensor_type for t in GGUFReader(str(out)).tensors}
    for k, v in TYPES.items():
        if v in OFFSETLESS:
            assert types[k] == QT.Q8_0, k
    assert len(report) == sum(v in OFFSETLESS for v in TYPES.values())
    assert all("re-encoded as Q8_0: max |dw| / max |w| = " in line for line in report)


@pytest.mark.filterwarnings("ignore:rank")
def test_mixed_adapter_json_has_per_layer_quantization(mixed_gguf, tmp_path):
    import json
    model = Transformer.from_pretrained(mixed_gguf, keep_quantized=True)
    from export import offsetless_layers
    exclude = tuple(offsetless_layers(model))
    add_adapters(model, rank=2, alpha=4.0, exclude=exclude)
    randomize_B(model)
    save_adapters(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert cfg["bits"] is None and cfg["exclude"] == sorted(exclude)
    assert cfg["layer_quant"]["layers.0.self_attn.q_proj"] == [4, 32]
    assert cfg["layer_quant"]["layers.0.mlp.down_proj"] == [5, 32]
    fresh = Transformer.from_pretrained(mixed_gguf, keep_quantized=True)
    load_adapters(fresh, tmp_path / "ad")                                    # the exclusions come back
    assert [n for n, _ in adapter_layers(fresh)] == [n for n, _ in adapter_layers(model)]
    ids = torch.randint(0, model.args.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def run_train(*args):
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout, r.stderr


def test_train_cli_on_a_mixed_file(mixed_gguf, tiny_data, tmp_path):
    """train.py on the mixed file: says which layers it leaves alone, merges exactly, writes merged.gguf."""
    common = ["--model", str(mixed_gguf), "--data", str(tiny_data / "alpaca.json"), "--n-heldout", "2",
              "--batch-size", "2", "--seq-len", "128", "--eval-every", "0", "--save-every", "0", "--threads", "1"]
    rc, out, err = run_train(*common, "--bits", "4", "--out", str(tmp_path / "refused"))
    assert rc != 0 and "mixes layer types" in err and "Traceback" not in err, err
    rc, out, err = run_train(*common, "--max-steps", "2", "--out", str(tmp_path / "run"))
    assert rc == 0, err
    assert "left without adapters" in out and "Q8_0 x1" in out and "Q6_K x1" in out, out
    assert (tmp_path / "run" / "merged.gguf").is_file()
    import json
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert abs(final["merged_eval_loss"] - final["unmerged_eval_loss"]) < 1e-4 * max(1.0, final["unmerged_eval_loss"])
