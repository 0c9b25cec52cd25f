"""Export a merged low-bit model: GGUF (llama.cpp: Q4_1 / Q5_1, or the source's own bytes) and MLX (mlx_lm's
affine layout). The only loss in either is rounding scales and biases to float16 (the formats store them so);
codes are written as they are.
Also the command line that merges an adapter into its base and exports it:

    python export.py --model DIR|FILE.gguf --adapter DIR --out DIR [--gguf FILE] [--mlx DIR] [--check]

A QA-LoRA adapter is folded exactly (merge.merge_adapters); a plain-LoRA one is merged in float and
requantized (merge.merge_lora_baseline: --quant rtn, or gptq with --calib).
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT, GGUFValueType, GGUFWriter, LlamaFileType, TokenType, quants
from gguf.vocab import BpeVocab, SentencePieceVocab, SpecialVocab
from safetensors.numpy import save_file as save_numpy

import data
import quant
from cli import ArgumentParser, UserError, atomic_path, run_cli
from gguf_codec import decode_blocks, encode_blocks, gguf_reader, ours_to_gguf, permute_qk
from merge import merge_adapters, merge_lora_baseline
from model import Transformer
from qalora import adapter_layers, load_adapters, read_adapter_config
from tokenizer import load_tokenizer


def _quantized(model, fmt):
    """[(name, QuantLinear)]; refuses a model that still has adapters (merge first)."""
    if adapter_layers(model):
        raise UserError(f"the model still has adapters: merge them before exporting to {fmt}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)]


def _heads(model, name):
    """Heads to permute for llama.cpp's q/k row order, or None for other layers."""
    return model.args.n_heads if ".q_proj" in name else model.args.n_kv_heads if ".k_proj" in name else None


# ----------------------------------------------------------------------------------------------------
# GGUF (llama.cpp). The rule for each quantized linear, codes never touched:
# - 4- and 5-bit codes in groups of multiples of 32 go out as Q4_1 / Q5_1, the types with a float scale d and
#   offset m per block of 32: from Q4_1/Q5_1 sources the codes and d are byte-identical and only m changes,
#   from Q4_0, Q5_0, Q4_K, Q5_K the codes are identical and scales and biases are rounded to f16;
# - other widths (Q8_0, Q6_K, Q3_K, Q2_K sources, 2/3/8-bit models) have no GGUF type of the same width with a
#   free offset: a layer the merge did not change is copied byte for byte (train.py's default, --offsetless skip,
#   trains no adapter there), and a changed one is re-encoded as Q8_0 only when asked (requantize=True),
#   with its error reported.
# Tensors the merge did not touch (norms, the embedding, rope_freqs) are copied from a GGUF source as they are.

OFFSET_TYPES = {4: QT.Q4_1, 5: QT.Q5_1}  # code width -> the GGUF type holding a float offset per block


def offset_type(layer):
    """The GGUF type this layer's codes go out as unchanged (Q4_1 / Q5_1), or None."""
    widths = quant.group_sizes(layer.in_features, layer.group_size)
    return OFFSET_TYPES.get(layer.bits) if all(w % 32 == 0 for w in widths) else None


def offsetless_layers(model):
    """{name: ggml_type} of the GGUF-loaded linears whose codes have no GGUF type of their width with a float
    offset (Q8_0, Q6_K, Q3_K, Q2_K): a merge that changes them cannot go out with the codes unchanged."""
    return {n: m.ggml_type for n, m in model.named_modules()
            if isinstance(m, quant.QuantLinear) and m.ggml_type and offset_type(m) is None}


def _source_tensors(model):
    return {t.name: t for t in gguf_reader(model.gguf_path).tensors} if model.gguf_path else {}


def _same_as_source(model, name, layer, src):
    """Does this layer still hold exactly the codes, scales and biases of its tensor in the source GGUF?"""
    t = src.get(ours_to_gguf(name + ".weight"))
    if t is None or t.tensor_type.name != layer.ggml_type:
        return False
    codes, scales, biases, bits, group = decode_blocks(t.tensor_type, t.data, layer.in_features)
    if h := _heads(model, name):
        codes, scales, biases = (permute_qk(x, h, inverse=True) for x in (codes, scales, biases))
    return (bits, group) == (layer.bits, layer.group_size) and torch.equal(codes, layer.codes()) and \
        torch.equal(scales, layer.scales.float()) and torch.equal(biases, layer.biases.float())


def gguf_plan(model, requantize=False):
    """{name: "Q4_1" | "Q5_1" | "copy" | "requantize Q8_0"} for every quantized linear; UserError when one
    fits no rule."""
    src, plan = _source_tensors(model), {}
    for name, layer in _quantized(model, "GGUF"):
        if (t := offset_type(layer)) is not None:
            plan[name] = t.name
        elif layer.ggml_type and _same_as_source(model, name, layer, src):
            plan[name] = "copy"
        elif requantize:
            plan[name] = "requantize Q8_0"
        elif layer.bits in OFFSET_TYPES:
            widths = sorted(set(quant.group_sizes(layer.in_features, layer.group_size)))
            raise UserError(f"GGUF export: {name} has {layer.bits}-bit groups of widths {widths}, but "
                            f"{OFFSET_TYPES[layer.bits].name} holds blocks of 32: quantize with --group-size 32, 64 "
                            f"or 128 (dividing the row) for a GGUF export, or use the checkpoint / MLX export")
        else:
            what = f"{layer.ggml_type}, changed by the merge" if layer.ggml_type else f"{layer.bits}-bit"
            raise UserError(f"GGUF export: {name} is {what}; GGUF has no {layer.bits}-bit type with a float offset "
                            f"per block, so its codes cannot go out unchanged: re-encode it as Q8_0 with --requantize "
                            f"(the error is reported), or train with --offsetless skip (the default), which leaves "
                            f"such layers without adapters")
    return plan


def gguf_unsupported(model, requantize=False):
    """Why the model cannot be written to GGUF (one line), or None when it can."""
    try:
        gguf_plan(model, requantize)
    except UserError as e:
        return str(e)
    return None


def _gguf_tensors(model, plan, report):
    """{gguf name: (numpy array, GGML type or None for plain float32)} in llama.cpp's layout; tensors planned
    "copy" are left out (the writer copies them from the source)."""
    quantized = dict(_quantized(model, "GGUF"))
    out = {}
    for name, layer in quantized.items():
        h = _heads(model, name)
        if plan[name] == "copy":
            pass
        elif plan[name] == "requantize Q8_0":
            w = layer.dequantize_weight()
            blocks = torch.from_numpy(quants.quantize(w.numpy(), QT.Q8_0))
            back = torch.from_numpy(quants.dequantize(blocks.numpy(), QT.Q8_0))
            report.append(f"{name} ({layer.ggml_type or f'{layer.bits}-bit'}) re-encoded as Q8_0: max |dw| / max |w| "
                          f"= {((back - w).abs().max() / w.abs().max()).item():.2e}")
            out[ours_to_gguf(name + ".weight")] = ((permute_qk(blocks, h, inverse=False) if h else blocks).numpy(), QT.Q8_0)
        else:
            kind = QT[plan[name]]
            blocks = torch.from_numpy(encode_blocks(kind, layer.codes(), layer.scales, layer.biases, layer.group_size))
            out[ours_to_gguf(name + ".weight")] = ((permute_qk(blocks, h, inverse=False) if h else blocks).numpy(), kind)
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
    """Does a float tensor of ours (a norm, the embedding), loaded from this GGUF tensor in the model's dtype,
    still equal it? Then the source's bytes are copied (the Q8_0 embedding stays Q8_0, even in bfloat16)."""
    if ours[1] is not None:
        return False
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


def export_gguf(model, path, requantize=False, report=None):
    """Write a merged model as a llama.cpp GGUF by the rules above; from a GGUF source every tensor the merge did
    not change is copied byte for byte and all metadata (tokenizer, chat template) is carried over; float
    sources get F32 and llama metadata. `report` (a list) receives a line per re-encoded tensor."""
    plan, report = gguf_plan(model, requantize), report if report is not None else []
    ours = _gguf_tensors(model, plan, report)
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
                if n in src_t and (n not in ours or _unchanged(src_t[n], ours[n], dtype)):  # also plan "copy"
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

def export_mlx(model, out_dir, dtype=torch.float16, tokenizer=None):
    """Write out_dir/{model.safetensors, config.json} (and `tokenizer`'s files when given)."""
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
        save_numpy(tensors, str(tmp / "model.safetensors"), metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out_dir


# ----------------------------------------------------------------------------------------------------
# CLI

def _check_ids(model, model_path):
    """A few prompts as token ids [3, T]: the tokenizer's when it loads, else fixed random ids."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
    try:
        tok = load_tokenizer(model_path)
        ids = [tok.encode(p) for p in prompts]
        T = min(len(i) for i in ids)
        return torch.tensor([i[:T] for i in ids])
    except (UserError, OSError):
        return torch.randint(0, model.args.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))


def main(argv=None):
    p = ArgumentParser(description="Merge a QA-LoRA adapter into its quantized base and export it.")
    p.add_argument("--model", required=True, help="the quantized base: checkpoint dir or .gguf")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter.json + adapter.safetensors)")
    p.add_argument("--out", required=True, help="merged checkpoint directory to write")
    p.add_argument("--gguf", default=None, help="also write a llama.cpp GGUF file here")
    p.add_argument("--mlx", default=None, help="also write an mlx_lm model directory here")
    p.add_argument("--mlx-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--quant", default="rtn", choices=["rtn", "gptq"], help="requantizer for plain-LoRA adapters")
    p.add_argument("--calib", default=None, help="calibration text file (plain-LoRA adapters with --quant gptq)")
    p.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--requantize", action="store_true",
                   help="GGUF: re-encode changed layers that have no same-width offset type (Q8_0, Q6_K, ...) as "
                        "Q8_0, reporting each tensor's error")
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
            tok = load_tokenizer(args.model)
            calib = data.calibration_windows(tok, args.calib, args.nsamples, args.seq_len)  # [n, T] ids
        q = model.quantization or {}
        merge_lora_baseline(model, q.get("bits", cfg["bits"]), q.get("group_size", cfg["group_size"]), args.quant, calib)
    tok = load_tokenizer(args.model, optional=True)
    model.save_pretrained(args.out, tokenizer=tok)
    print(f"merged {cfg['method']} adapter (rank {cfg['rank']}) into {args.out}")
    outputs = [("checkpoint", args.out)]
    if args.gguf:
        report = []
        export_gguf(model, args.gguf, requantize=args.requantize, report=report)
        for line in report:
            print(f"  {line}")
        outputs.append(("gguf", args.gguf))
        print(f"wrote {args.gguf}")
    if args.mlx:
        export_mlx(model, args.mlx, getattr(torch, args.mlx_dtype), tokenizer=tok)
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
