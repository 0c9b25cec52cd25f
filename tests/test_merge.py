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
from export import export_gguf, export_mlx
from merge import merge_adapters, merge_lora_baseline
from model import Transformer, UserError
from tokenizer import load_tokenizer
from qalora import POOL_SCALES, QALoRALinear, add_adapters, adapter_layers, save_adapters

ROOT = Path(__file__).resolve().parents[1]

from conftest import quantized_model, randomize_B  # noqa: E402


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
@pytest.mark.parametrize("pool_scale", POOL_SCALES)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128])
def test_merge_is_exact(tiny_args, bits, group_size, pool_scale):
    model = quantized_model(tiny_args, bits, group_size, dim=80, hidden_dim=200, n_heads=4, n_kv_heads=2)
    before = quant_state(model)
    add_adapters(model, rank=2, alpha=4.0, pool_scale=pool_scale)
    randomize_B(model)
    ids = torch.randint(0, model.args.vocab_size, (2, 12))
    with torch.no_grad():
        unmerged = model(ids)
        merge_adapters(model)
        merged = model(ids)
    assert rel_err(merged, unmerged) < 1e-5, f"bits={bits} g={group_size} {pool_scale}: {rel_err(merged, unmerged):.2e}"
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
    add_adapters(model, rank=2, alpha=3.0, targets=("down_proj",), pool_scale="mean")
    randomize_B(model)
    layer = model.layers[0].mlp.down_proj
    expect = layer.base.biases.double() + 1.5 * (layer.lora_B.weight.double() @ layer.lora_A.weight.double()) \
        / torch.tensor([64.0, 64.0, 64.0, 8.0], dtype=torch.float64)
    merge_adapters(model)
    torch.testing.assert_close(model.layers[0].mlp.down_proj.biases, expect.float(), rtol=0, atol=0)


@pytest.mark.parametrize("pool_scale,c", [("mean", [1.0] * 4), ("sum", [64.0, 64.0, 64.0, 8.0]),
                                          ("sqrt", [8.0, 8.0, 8.0, 8 ** 0.5]), ("ngroups", [4.0] * 4)])
def test_merge_formula_per_pool_scale(tiny_args, pool_scale, c):
    """biases'[:, g] = biases[:, g] + s * c_g * (B @ A)[:, g] / size(g), c_g written out by hand."""
    model = quantized_model(tiny_args, 4, 64, dim=80, hidden_dim=200)
    add_adapters(model, rank=2, alpha=3.0, targets=("down_proj",), pool_scale=pool_scale)
    randomize_B(model)
    layer = model.layers[0].mlp.down_proj
    sizes = torch.tensor([64.0, 64.0, 64.0, 8.0], dtype=torch.float64)
    expect = layer.base.biases.double() + 1.5 * (layer.lora_B.weight.double() @ layer.lora_A.weight.double()) \
        * torch.tensor(c, dtype=torch.float64) / sizes
    merge_adapters(model)
    torch.testing.assert_close(model.layers[0].mlp.down_proj.biases, expect.float(), rtol=1e-7, atol=0)


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


# ----------------------------------------------------------------------------------------------------
# GGUF: decoded here with numpy, independently of merge.py and model.py

def decode_q4_1(data, rows, cols):
    """llama.cpp's dequantize_row_q4_1: per 32 weights f16 d, f16 m, 16 bytes; w = d * q + m."""
    b = np.asarray(data, dtype=np.uint8).reshape(rows, cols // 32, 20)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)          # [rows, nb, 1]
    m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([b[..., 4:] & 0x0F, b[..., 4:] >> 4], axis=-1)  # [rows, nb, 32]: j | j+16 << 4
    return (d * q.astype(np.float32) + m).reshape(rows, cols), q.reshape(rows, cols)


def gguf_rows_to_hf(w, n_heads):
    """llama.cpp's converter interleaves each q/k head's two rotary halves; undo it."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # [h, d/2, 2] -> [h, 2, d/2]


GGUF_NAME = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def merged_model(tiny_args, bits, group_size, **kw):
    model = quantized_model(tiny_args, bits, group_size, **kw)
    add_adapters(model, rank=2, alpha=4.0)
    randomize_B(model)
    return merge_adapters(model)


# dim 96 / hidden 160: group 64 -> 64 + a short 32; group 128 -> the 96-wide row, and 128 + a short 32
@pytest.mark.filterwarnings("ignore:rank 2 exceeds")
@pytest.mark.parametrize("group_size,tie", [(32, False), (64, True), (128, False)])
def test_gguf_round_trip(tiny_args, tmp_path, group_size, tie, capsys):
    from gguf import GGUFReader
    scaling = None if tie else {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = merged_model(tiny_args, 4, group_size, dim=96, hidden_dim=160, n_heads=4, n_kv_heads=2,
                         tie_embeddings=tie, rope_scaling=scaling)
    path = export_gguf(model, tmp_path / "m.gguf")
    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    a = model.args
    assert field("general.architecture") == "llama" and field("llama.block_count") == a.n_layers
    assert (field("llama.embedding_length"), field("llama.feed_forward_length")) == (a.dim, a.hidden_dim)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert ("output.weight" in tensors) != tie and ("rope_freqs.weight" in tensors) == (scaling is not None)
    worst = 0.0
    for i in range(a.n_layers):
        for name, layer in model.layers[i].named_modules():
            if not isinstance(layer, quant.QuantLinear):
                continue
            t = tensors[f"blk.{i}.{GGUF_NAME[name.split('.')[-1]]}.weight"]
            assert t.tensor_type.name == "Q4_1"
            w, q = decode_q4_1(t.data, layer.out_features, layer.in_features)
            heads = 4 if name.endswith("q_proj") else 2 if name.endswith("k_proj") else None
            if heads:
                w, q = gguf_rows_to_hf(w, heads), gguf_rows_to_hf(q, heads)
            assert np.array_equal(q, layer.codes().numpy())                              # codes exact
            f16 = quant.dequantize(layer.codes(), layer.scales.half().float(), layer.biases.half().float(),
                                   layer.group_size).numpy()
            assert np.array_equal(w, f16)                  # exactly our weights with scales/biases in f16
            ours = layer.dequantize_weight().numpy()
            bound = quant.dequantize(layer.codes(), layer.scales.abs() * 2.0**-11,
                                     layer.biases.abs() * 2.0**-11, layer.group_size).numpy()
            assert (np.abs(w - ours) <= bound + 1e-12).all()   # |err| <= 2^-11 (|d| q + |m|): f16 rounding only
            worst = max(worst, float(np.abs(w - ours).max() / np.abs(ours).max()))
    np.testing.assert_array_equal(tensors["token_embd.weight"].data, model.embed_tokens.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["output_norm.weight"].data, model.norm.weight.detach().numpy())
    with capsys.disabled():
        print(f"\nGGUF Q4_1 export g{group_size}: max |w_gguf - w| / max |w| = {worst:.2e} (f16 scales/biases)")
    reloaded = Transformer.from_pretrained(path, keep_quantized=True)   # model.py's loader agrees
    torch.testing.assert_close(reloaded.inv_freq, model.inv_freq)
    if group_size == 32:
        for (n1, m1), (n2, m2) in zip(model.named_modules(), reloaded.named_modules()):
            if isinstance(m1, quant.QuantLinear):
                assert n1 == n2 and torch.equal(m1.codes(), m2.codes()), n1
                assert torch.equal(m1.biases.half().float(), m2.biases), n1
    ids = torch.randint(0, a.vocab_size, (2, 10))
    with torch.no_grad():
        assert rel_err(reloaded(ids), model(ids)) < 1e-2


@pytest.mark.parametrize("via_checkpoint", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_reexport_without_changes_is_byte_identical(tiny_args, tmp_path, dtype, via_checkpoint):
    """GGUF -> load (codes kept, any dtype) [-> save_pretrained -> load] -> export: every tensor's bytes
    come back unchanged. A saved checkpoint remembers its GGUF source, so in bfloat16 the F32 norms and
    embedding are still copied from the source rather than re-encoded from the bfloat16 copies."""
    from gguf import GGUFReader
    first = export_gguf(merged_model(tiny_args, 4, 32), tmp_path / "a.gguf")
    model = Transformer.from_pretrained(first, dtype=dtype, keep_quantized=True)
    if via_checkpoint:
        model = Transformer.from_pretrained(model.save_pretrained(tmp_path / "ckpt"), dtype=dtype)
        assert model.gguf_path == str(first.resolve())
    second = export_gguf(model, tmp_path / "b.gguf")
    a, b = GGUFReader(str(first)), GGUFReader(str(second))
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.data.tobytes() == y.data.tobytes(), x.name


def test_gguf_refuses_what_q4_1_cannot_hold(tiny_args, tmp_path):
    with pytest.raises(UserError, match=r"widths \[16\]"):
        export_gguf(merged_model(tiny_args, 4, 16), tmp_path / "a.gguf")
    with pytest.raises(UserError, match="3-bit"):
        export_gguf(merged_model(tiny_args, 3, 32), tmp_path / "b.gguf")
    assert not list(tmp_path.iterdir())                 # nothing half-written


@pytest.mark.slow
def test_smollm2_end_to_end_gguf_bytes(smollm_gguf, tmp_path):
    """The embedded default: Q4_1 kept as codes, adapters trained two steps, merged, exported. Every Q4_1
    block keeps its codes and d byte for byte, only m moves; every other tensor is byte-identical."""
    from gguf import GGUFReader
    model = Transformer.from_pretrained(smollm_gguf, keep_quantized=True)
    params = add_adapters(model, rank=4, alpha=8.0)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, model.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(torch.count_nonzero(m.lora_B.weight) > 0 for _, m in adapter_layers(model))
    with torch.no_grad():
        before = model(ids)
        merge_adapters(model)
        assert rel_err(model(ids), before) < 1e-5
    out = export_gguf(model, tmp_path / "merged.gguf")
    src, new = GGUFReader(smollm_gguf), GGUFReader(str(out))
    assert [t.name for t in src.tensors] == [t.name for t in new.tensors]
    moved = 0
    for a, b in zip(src.tensors, new.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape), a.name
        if a.tensor_type.name == "Q4_1":
            x = np.asarray(a.data).reshape(a.data.shape[0], -1, 20)
            y = np.asarray(b.data).reshape(x.shape)
            assert np.array_equal(x[..., 0:2], y[..., 0:2]) and np.array_equal(x[..., 4:], y[..., 4:]), a.name
            moved += not np.array_equal(x[..., 2:4], y[..., 2:4])
        else:   # the Q8_0 embedding (also the head) and the F32 norms
            assert a.data.tobytes() == b.data.tobytes(), a.name
    assert moved == 7 * model.args.n_layers   # every adapted layer's mins moved
    for k, f in src.fields.items():
        if not k.startswith("GGUF."):
            assert new.fields[k].contents() == f.contents(), k   # tokenizer, chat template, llama.*


# ----------------------------------------------------------------------------------------------------
# MLX: model.safetensors decoded here (uint32 words -> LSB-first bit stream -> codes)

def decode_mlx(words, scales, biases, bits, group_size):
    rows = words.shape[0]
    stream = np.unpackbits(words.astype("<u4").view(np.uint8), axis=1, bitorder="little")  # [rows, in*bits]
    q = (stream.reshape(rows, -1, bits).astype(np.int64) << np.arange(bits)).sum(-1)      # [rows, in]
    s = np.repeat(scales.astype(np.float32), group_size, axis=1)
    b = np.repeat(biases.astype(np.float32), group_size, axis=1)
    return q, s * q.astype(np.float32) + b


@pytest.mark.filterwarnings("ignore:rank 2 exceeds")
@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 32), (8, 128)])
def test_mlx_export_decodes_to_our_weights(tiny_args, tmp_path, bits, group_size):
    from safetensors.numpy import load_file
    model = merged_model(tiny_args, bits, group_size, dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2)
    out = export_mlx(model, tmp_path / "mlx", dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": group_size, "bits": bits} and cfg["model_type"] == "llama"
    tensors = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" in tensors and "model.norm.weight" in tensors
    for name, layer in model.named_modules():
        if not isinstance(layer, quant.QuantLinear):
            continue
        words = tensors[f"model.{name}.weight"]
        assert words.dtype == np.uint32 and words.shape == (layer.out_features, layer.in_features * bits // 32)
        q, w = decode_mlx(words, tensors[f"model.{name}.scales"], tensors[f"model.{name}.biases"], bits, group_size)
        assert np.array_equal(q, layer.codes().numpy().astype(np.int64)), name
        np.testing.assert_array_equal(w, layer.dequantize_weight().numpy())
    half = export_mlx(model, tmp_path / "mlx16")                       # default float16, as mlx_lm uses
    t16 = load_file(str(half / "model.safetensors"))
    assert t16["model.layers.0.mlp.up_proj.scales"].dtype == np.float16
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "float16"


def test_mlx_refuses_groups_it_cannot_run(tiny_args, tmp_path):
    with pytest.raises(UserError, match="group_size=16"):
        export_mlx(merged_model(tiny_args, 4, 16), tmp_path / "a")
    with pytest.raises(UserError, match="in_features=80"):
        export_mlx(merged_model(tiny_args, 4, 32, dim=80, hidden_dim=128), tmp_path / "b")


# ----------------------------------------------------------------------------------------------------
# the CLI

def run_merge(*args):
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_merges_exports_and_checks(tiny_args, tmp_path):
    base = quantized_model(tiny_args, 4, 32)
    base.save_pretrained(tmp_path / "base")
    model = Transformer.from_pretrained(tmp_path / "base")
    add_adapters(model, rank=2, alpha=4.0)
    randomize_B(model)
    save_adapters(model, tmp_path / "adapter")
    r = run_merge("--model", tmp_path / "base", "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged",
                  "--gguf", tmp_path / "merged.gguf", "--mlx", tmp_path / "mlx", "--check")
    assert r.returncode == 0, r.stderr
    diffs = {line.split()[1].rstrip(":"): float(line.split("relative ")[1].rstrip(")"))
             for line in r.stdout.splitlines() if line.startswith("check ")}
    assert diffs["checkpoint"] < 1e-5 and diffs["gguf"] < 1e-2, r.stdout
    assert (tmp_path / "mlx" / "model.safetensors").is_file()
    merged = Transformer.from_pretrained(tmp_path / "merged")
    merge_adapters(model)
    for (n, a), (_, b) in zip(model.named_modules(), merged.named_modules()):
        if isinstance(a, quant.QuantLinear):
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.biases, b.biases), n
    again = run_merge("--model", tmp_path / "base", "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged")
    assert again.returncode == 1 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    bad_flag = run_merge("--model", tmp_path / "base", "--adapter", tmp_path / "adapter", "--mlx-dtype", "int8")
    assert bad_flag.returncode == 2 and len(bad_flag.stderr.strip().splitlines()) == 1, bad_flag.stderr
    import export
    with pytest.raises(UserError, match="another base"):      # the merged model is not the adapter's base
        export.main(["--model", str(tmp_path / "merged"), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="adapter.json"):
        export.main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "y")])


def test_cli_baseline_adapter_requantizes(tiny_args, tmp_path, capsys):
    import export
    quantized_model(tiny_args, 4, 32).save_pretrained(tmp_path / "base")
    model = Transformer.from_pretrained(tmp_path / "base")
    add_adapters(model, rank=2, alpha=4.0, method="lora")
    randomize_B(model)
    save_adapters(model, tmp_path / "adapter")
    export.main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                "--out", str(tmp_path / "merged"), "--check"])
    out = capsys.readouterr().out
    rel = float(out.split("relative ")[1].split(")")[0])
    assert "merged lora adapter" in out and rel > 1e-4, out          # requantization is not exact
    with pytest.raises(UserError, match="--calib"):
        export.main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                    "--out", str(tmp_path / "m2"), "--quant", "gptq"])


def test_cli_baseline_gptq(tiny_model_dir, tiny_data, tmp_path, capsys):
    """A plain-LoRA adapter on a 4-bit base with a sentencepiece tokenizer beside it (conftest's tiny model),
    merged and requantized with GPTQ calibrated on a text file through that tokenizer."""
    import export
    base = quant.quantize_model(Transformer.from_pretrained(tiny_model_dir), 4, 32)
    base.save_pretrained(tmp_path / "base", tokenizer=load_tokenizer(tiny_model_dir))  # the tokenizer beside it
    model = Transformer.from_pretrained(tmp_path / "base")
    add_adapters(model, rank=2, alpha=4.0, method="lora")
    randomize_B(model, std=0.02)
    save_adapters(model, tmp_path / "adapter")
    export.main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out",
                str(tmp_path / "merged"), "--quant", "gptq", "--calib", str(tiny_data / "calib.txt"),
                "--nsamples", "8", "--seq-len", "64", "--check"])
    out = capsys.readouterr().out
    assert "check checkpoint" in out and Transformer.from_pretrained(tmp_path / "merged").quantization["method"] == "gptq"


def test_gguf_from_float_source_carries_the_tokenizer(tiny_args, tiny_model_dir, tmp_path):
    """A float source directory's sentencepiece tokenizer (conftest's, trained in the test session) becomes
    llama.cpp tokenizer metadata."""
    import sentencepiece
    from gguf import GGUFReader
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    model = merged_model(tiny_args, 4, 32, vocab_size=sp.vocab_size())
    model.source = str(tiny_model_dir)
    reader = GGUFReader(str(export_gguf(model, tmp_path / "m.gguf")))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "llama"
    assert field("tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    np.testing.assert_allclose(field("tokenizer.ggml.scores"), [sp.get_score(i) for i in range(sp.vocab_size())])
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (sp.bos_id(), sp.eos_id())


@pytest.mark.slow
def test_gguf_from_bpe_directory_tokenizes_like_the_source(tiny_args, smollm_gguf, tmp_path):
    """A checkpoint directory with SmolLM2's tokenizer.json -> GGUF whose tokenizer matches the original."""
    import tokenizer as tokenizer_mod
    original = tokenizer_mod.load_tokenizer(smollm_gguf)
    original.save(tmp_path)
    model = merged_model(tiny_args, 4, 32, vocab_size=original.vocab_size)
    model.source = str(tmp_path)
    again = tokenizer_mod.load_tokenizer(str(export_gguf(model, tmp_path / "m.gguf")))
    text = "In 1987, 12 robots said: 'hello   world' <|im_end|>\n\tdone."
    assert again.encode(text) == original.encode(text) and (again.bos_id, again.eos_id) == (original.bos_id, original.eos_id)
