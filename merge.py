"""Fold QA-LoRA adapters into the quantized base, exactly; the plain-LoRA baseline's merge; export.

QA-LoRA's adapter adds s * B @ A @ (c * pool(x)). pool averages each quantization group and c_g is
the adapter's pool scale (qalora.py: 1 for the mean, size(g) for the sum, ...), so for row o and group
g the adapter contributes s * c_g * (B @ A)[o, g] / size(g) * sum_{i in g} x_i: a per-(row, group)
constant times the group's input sum, which is exactly what a bias of the affine quantizer does:

    biases'[o, g] = biases[o, g] + s * c_g * (B @ A)[o, g] / size(g)     (float64, then cast)

Codes and scales are untouched, so the merged model is again a pure `bits`-bit model. Plain LoRA's
B @ A is dense: merging it means dequantize, add, and quantize again (RTN or GPTQ), which is lossy.

    python merge.py --model DIR|FILE.gguf --adapter DIR --out DIR [--gguf FILE] [--mlx DIR] [--check]

Exports: GGUF (llama.cpp Q4_1) and MLX (mlx_lm's affine layout). The only loss in either is rounding
scales and biases to float16 (the formats store them so); codes are written as they are.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import quant
from model import (ArgumentParser, Transformer, UserError, atomic_path, gguf_reader, ours_to_gguf, permute_qk,
                   run_cli)
from qalora import LoRALinear, QALoRALinear, adapter_layers, load_adapters, read_adapter_config


# ----------------------------------------------------------------------------------------------------
# The exact merge (QA-LoRA) and the lossy one (plain LoRA: float merge, then requantize)

@torch.no_grad()
def merge_adapters(model):
    """In place: every QALoRALinear becomes its base QuantLinear with the adapter folded into biases."""
    for name, layer in adapter_layers(model):
        if isinstance(layer, LoRALinear):
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
    """The QLoRA baseline: each LoRALinear -> float nn.Linear(W~ + s * B @ A), then quantize_model
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


def _quantized(model, fmt):
    """[(name, QuantLinear)]; refuses a model that still has adapters (merge first)."""
    if adapter_layers(model):
        raise UserError(f"the model still has adapters: merge them before exporting to {fmt}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)]


def _heads(model, name):
    """Heads to permute for llama.cpp's q/k row order, or None for other layers."""
    return model.args.n_heads if ".q_proj" in name else model.args.n_kv_heads if ".k_proj" in name else None


# ----------------------------------------------------------------------------------------------------
# GGUF (llama.cpp). Q4_1 block of 32 weights = 20 bytes: f16 d, f16 m, 16 bytes qs with weight j in
# the low nibble of qs[j] and weight j+16 in its high nibble; w = d * q + m. A group of 64 or 128 is
# written as 2 or 4 blocks repeating its (d, m). Rounding d and m to f16 is the export's only loss;
# for a model loaded from a Q4_1 file d is already the file's f16, so only the merged m is rounded.

def q4_1_blocks(layer):
    """QuantLinear (4-bit, groups of multiples of 32) -> Q4_1 rows, uint8 [out, in/32 * 20]."""
    codes = layer.codes()                                                        # [out, in]
    out, n = codes.shape
    widths = quant.group_sizes(n, layer.group_size)
    per = widths[0] // 32 if len(set(widths)) == 1 else torch.tensor(widths) // 32  # blocks per group
    d = layer.scales.to(torch.float16).repeat_interleave(per, dim=1)             # [out, nb]
    m = layer.biases.to(torch.float16).repeat_interleave(per, dim=1)             # [out, nb]
    q = codes.view(out, n // 32, 32)
    qs = q[..., :16] | (q[..., 16:] << 4)                                        # [out, nb, 16]
    as_bytes = lambda t: t.contiguous().view(torch.uint8).view(out, n // 32, 2)  # noqa: E731
    return torch.cat([as_bytes(d), as_bytes(m), qs], dim=-1).reshape(out, -1)    # [out, nb * 20]


def _gguf_tensors(model):
    """{gguf name: (numpy array, GGML type or None for plain float32)} in llama.cpp's layout."""
    from gguf import GGMLQuantizationType as QT
    quantized = dict(_quantized(model, "GGUF"))
    for name, layer in quantized.items():
        if layer.bits != 4 or layer.group_size % 32 or layer.in_features % 32:
            raise UserError(f"GGUF export writes Q4_1 (4 bits, blocks of 32): {name} has bits={layer.bits}, "
                            f"group_size={layer.group_size}, in_features={layer.in_features}; quantize with "
                            f"--bits 4 and a group size that is a multiple of 32 (32, 64, 128)")
    out = {}
    for name, layer in quantized.items():
        blocks = q4_1_blocks(layer)
        if h := _heads(model, name):
            blocks = permute_qk(blocks, h, inverse=False)
        out[ours_to_gguf(name + ".weight")] = (blocks.numpy(), QT.Q4_1)
        if layer.bias is not None:
            b = layer.bias.float()
            out[ours_to_gguf(name + ".bias")] = ((permute_qk(b, h, inverse=False) if h else b).numpy(), None)
    for key, t in model.state_dict().items():
        mod = key.rsplit(".", 1)[0]
        if mod in quantized or (key == "lm_head.weight" and model.args.tie_embeddings):
            continue
        t = t.float()
        if h := _heads(model, key):
            t = permute_qk(t, h, inverse=False)
        out[ours_to_gguf(key)] = (t.contiguous().numpy(), None)
    if model.args.rope_scaling:  # llama3 rope: llama.cpp divides the base frequencies by rope_freqs
        base = 1.0 / model.args.rope_theta ** (torch.arange(0, model.args.head_dim, 2).double() / model.args.head_dim)
        out["rope_freqs.weight"] = ((base / model.inv_freq.double()).float().numpy(), None)
    return out


def _unchanged(src_tensor, ours, dtype):
    """Does a GGUF tensor, loaded in the model's dtype, still equal what the model holds? Then its
    bytes are copied (the Q8_0 embedding stays Q8_0, even for a model run in bfloat16)."""
    from gguf import GGMLQuantizationType as QT, quants
    if src_tensor.tensor_type == QT.Q4_1 or ours[1] is not None:
        return False  # quantized linears are re-encoded (codes and d come out identical, m changed)
    src = torch.from_numpy(np.asarray(quants.dequantize(src_tensor.data, src_tensor.tensor_type), np.float32))
    return tuple(src.shape) == ours[0].shape and np.array_equal(src.to(dtype).float().numpy(), ours[0])


def _bpe_pre(path):
    """llama.cpp's name for a tokenizer.json's pre-tokenizer (the ones tokenizer.py reads back)."""
    pre = json.dumps(json.loads(path.read_text()).get("pre_tokenizer")) if path.is_file() else ""
    if '"individual_digits": true' in pre:
        return "smollm"        # digits split one by one, then GPT-2 byte level
    return "llama-bpe" if '"Split"' in pre else "gpt2"


def _float_source_metadata(writer, model):
    """llama.* keys from model.args, and tokenizer metadata from the source directory when it has one."""
    from gguf import LlamaFileType
    a = model.args
    writer.add_context_length(a.max_seq_len)
    writer.add_embedding_length(a.dim)
    writer.add_block_count(a.n_layers)
    writer.add_feed_forward_length(a.hidden_dim)
    writer.add_head_count(a.n_heads)
    writer.add_head_count_kv(a.n_kv_heads)
    writer.add_layer_norm_rms_eps(a.norm_eps)
    writer.add_rope_freq_base(a.rope_theta)
    writer.add_rope_dimension_count(a.head_dim)
    writer.add_vocab_size(a.vocab_size)
    if a.head_dim != a.dim // a.n_heads:
        writer.add_key_length(a.head_dim)
        writer.add_value_length(a.head_dim)
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(2)
    if model.source and os.path.isdir(model.source):
        _tokenizer_metadata(writer, Path(model.source))


def _tokenizer_metadata(writer, src):
    """llama.cpp's tokenizer keys from a directory's tokenizer.model (sentencepiece) or byte-level BPE
    tokenizer.json; special added tokens become CONTROL tokens, as llama.cpp's converter marks them."""
    from gguf import TokenType
    from gguf.vocab import BpeVocab, SentencePieceVocab, SpecialVocab
    for vocab_cls in (SentencePieceVocab, BpeVocab):
        try:
            vocab = vocab_cls(src)
        except (FileNotFoundError, KeyError, ValueError, RuntimeError):
            continue
        tokens, scores, types = map(list, zip(*vocab.all_tokens()))
        bpe = vocab.tokenizer_model == "gpt2"
        if bpe and (src / "tokenizer.json").is_file():
            for t in json.loads((src / "tokenizer.json").read_text()).get("added_tokens") or []:
                if t["id"] < len(types):
                    types[t["id"]] = TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if bpe:
            writer.add_tokenizer_pre(_bpe_pre(src / "tokenizer.json"))
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        if not bpe:  # the normalizer settings a sentencepiece vocab needs, read off the model's behaviour
            sp = vocab.sentencepiece_tokenizer
            writer.add_add_space_prefix(sp.encode_as_pieces("a")[0].startswith("\u2581"))
            writer.add_remove_extra_whitespaces(sp.encode("a  b") == sp.encode("a b"))
        SpecialVocab(src, load_merges=bpe, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        return


def export_gguf(model, path):
    """Write a merged 4-bit model as a llama.cpp GGUF: Q4_1 linears; from a GGUF source every tensor
    the merge did not change (norms, the Q8_0 embedding/head, rope_freqs) is copied byte for byte and
    all metadata (tokenizer, chat template) is carried over; float sources get F32 and llama metadata."""
    from gguf import GGUFValueType, GGUFWriter
    ours = _gguf_tensors(model)
    src = gguf_reader(model.gguf_path) if model.gguf_path else None
    with atomic_path(path) as tmp:
        writer = GGUFWriter(str(tmp), "llama")
        if src is not None:
            for field in src.fields.values():
                if field.name.startswith("GGUF.") or field.name == "general.architecture":
                    continue
                sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
            src_t = {t.name: t for t in src.tensors}
            names = list(src_t) + [n for n in ours if n not in src_t]          # the source's tensor order
            dtype = model.embed_tokens.weight.dtype
            for n in names:
                if n in src_t and (n not in ours or _unchanged(src_t[n], ours[n], dtype)):
                    t = src_t[n]
                    writer.add_tensor(n, t.data, raw_dtype=t.tensor_type)  # the source's bytes
                else:
                    writer.add_tensor(n, ours[n][0], raw_dtype=ours[n][1])
        else:
            _float_source_metadata(writer, model)
            for n, (arr, kind) in ours.items():
                writer.add_tensor(n, arr, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


# ----------------------------------------------------------------------------------------------------
# MLX (mlx_lm). Same affine convention. A quantized linear <name> is stored as <name>.weight: uint32
# [out, in * bits / 32], each row the LSB-first bit stream of its codes read as little-endian words
# (32/bits codes per word for 2/4/8 bits; 3 bits: 8 codes per 3 bytes, crossing words) which is
# quant.pack's byte layout; <name>.scales and <name>.biases [out, n_groups]. config.json's
# "quantization": {"group_size", "bits"} (per-layer entries where a layer differs). MLX needs
# groups of 32, 64 or 128 that divide the row.

def export_mlx(model, out_dir, dtype=torch.float16):
    """Write out_dir/{model.safetensors, config.json} (and the tokenizer when the source has one)."""
    from safetensors.numpy import save_file
    if dtype not in (torch.float16, torch.float32):
        raise UserError(f"MLX export dtype must be float16 or float32, got {dtype}")
    quantized = dict(_quantized(model, "MLX"))
    if not quantized:
        raise UserError("MLX export expects a quantized model (no QuantLinear found)")
    first = next(iter(quantized.values()))
    qcfg = {"group_size": first.group_size, "bits": first.bits}
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    tensors = {}
    for name, layer in quantized.items():
        if layer.group_size not in (32, 64, 128) or layer.in_features % layer.group_size:
            raise UserError(f"MLX needs group sizes 32, 64 or 128 that divide the row: {name} has "
                            f"group_size={layer.group_size}, in_features={layer.in_features}")
        if (layer.group_size, layer.bits) != (qcfg["group_size"], qcfg["bits"]):
            qcfg[f"model.{name}"] = {"group_size": layer.group_size, "bits": layer.bits}
        packed = quant.pack(layer.codes(), layer.bits).numpy()                   # [out, in*bits/8] bytes
        tensors[f"model.{name}.weight"] = packed.view("<u4")                     # [out, in*bits/32]
        tensors[f"model.{name}.scales"] = layer.scales.numpy().astype(np_dtype)
        tensors[f"model.{name}.biases"] = layer.biases.numpy().astype(np_dtype)
        if layer.bias is not None:
            tensors[f"model.{name}.bias"] = layer.bias.float().numpy().astype(np_dtype)
    for key, t in model.state_dict().items():
        if key.rsplit(".", 1)[0] in quantized or (key == "lm_head.weight" and model.args.tie_embeddings):
            continue
        tensors[key if key.startswith("lm_head.") else "model." + key] = t.float().numpy().astype(np_dtype)
    cfg = model.args.to_hf_config()
    cfg.update(quantization=qcfg, quantization_config=qcfg, torch_dtype=str(dtype).replace("torch.", ""))
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        model.save_tokenizer(tmp)
    return out_dir


# ----------------------------------------------------------------------------------------------------
# CLI

def _check_ids(model, model_path):
    """A few prompts as token ids [3, T]: the tokenizer's when it loads, else fixed random ids."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
    try:
        import tokenizer as tokenizer_mod
        tok = tokenizer_mod.load_tokenizer(model_path)
        ids = [tok.encode(p) for p in prompts]
        T = min(len(i) for i in ids)
        return torch.tensor([i[:T] for i in ids])
    except (UserError, OSError, ImportError):
        return torch.randint(0, model.args.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))


def main(argv=None):
    p = ArgumentParser(description="Merge a QA-LoRA adapter into its quantized base and export it.")
    p.add_argument("--model", required=True, help="the quantized base: checkpoint dir or Q4_1 .gguf")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter.json + adapter.safetensors)")
    p.add_argument("--out", required=True, help="merged checkpoint directory to write")
    p.add_argument("--gguf", default=None, help="also write a llama.cpp Q4_1 GGUF file here")
    p.add_argument("--mlx", default=None, help="also write an mlx_lm model directory here")
    p.add_argument("--mlx-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--quant", default="rtn", choices=["rtn", "gptq"], help="requantizer for plain-LoRA adapters")
    p.add_argument("--calib", default=None, help="calibration text file (plain-LoRA adapters with --quant gptq)")
    p.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--check", action="store_true", help="reload the outputs and print max |logit diff|")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = p.parse_args(argv)
    if args.quant == "gptq" and not args.calib:
        raise UserError("--quant gptq needs --calib FILE (plain text to calibrate on)")
    if os.path.exists(args.out) and not args.overwrite:
        raise UserError(f"{args.out} exists: pass --overwrite to replace it, or choose another --out")
    cfg = read_adapter_config(args.adapter)
    model = Transformer.from_pretrained(args.model, keep_quantized=True)
    load_adapters(model, args.adapter)
    ids = _check_ids(model, args.model) if args.check else None
    with torch.no_grad():
        before = model(ids) if args.check else None
    if cfg["method"] == "qalora":
        merge_adapters(model)
    else:  # the baseline: float merge, then quantize again (RTN, or GPTQ on calibration text)
        calib = None
        if args.quant == "gptq":
            import data
            import tokenizer as tokenizer_mod
            tok = tokenizer_mod.load_tokenizer(args.model)
            calib = data.calibration_windows(tok, args.calib, args.nsamples, args.seq_len)  # [n, T] ids
        q = model.quantization or {}
        merge_lora_baseline(model, q.get("bits", cfg["bits"]), q.get("group_size", cfg["group_size"]), args.quant, calib)
    model.save_pretrained(args.out)
    print(f"merged {cfg['method']} adapter (rank {cfg['rank']}) into {args.out}")
    outputs = [("checkpoint", args.out)]
    if args.gguf:
        export_gguf(model, args.gguf)
        outputs.append(("gguf", args.gguf))
        print(f"wrote {args.gguf}")
    if args.mlx:
        export_mlx(model, args.mlx, getattr(torch, args.mlx_dtype))
        print(f"wrote {args.mlx}")
    if args.check:
        scale = before.abs().max().item()
        for what, path in outputs:
            with torch.no_grad():
                after = Transformer.from_pretrained(path, keep_quantized=True)(ids)
            d = (after - before).abs().max().item()
            print(f"check {what}: max |logit diff| vs unmerged = {d:.3e} (max |logit| {scale:.2f}, "
                  f"relative {d / scale:.2e})")


if __name__ == "__main__":
    run_cli(main)
