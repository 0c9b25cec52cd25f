"""The LLaMA model: ModelArgs from HF config.json, RMSNorm, RoPE (theta, llama3 scaling), grouped-query
attention with a KV cache, SwiGLU MLP, tied or untied head; and loading real checkpoints:

- Hugging Face LLaMA directories (config.json + one or several *.safetensors, with or without the index),
- this project's quantized checkpoints (config.json with a "quantization" object -> QuantLinear layers),
- llama.cpp GGUF files read with the `gguf` package (F32/F16/BF16; Q4_1 and Q8_0 dequantized here, or
  Q4_1 kept as codes with keep_quantized=True).

Module names follow HF's without the leading "model." so a state dict maps onto HF keys by a prefix.
The RoPE convention is HF's rotate_half (first half / second half of each head), not Meta's interleaved
pairs; GGUF files store q/k rows in Meta's interleaved order and are permuted back on load (see
`_unpermute_qk`).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from safetensors import safe_open
from safetensors.torch import save_file

from cli import UserError, atomic_path
from gguf_codec import (FLOAT_TYPES, check_supported, decode_blocks, gguf_field, gguf_reader, gguf_to_ours, is_gguf,
                        permute_qk)
from kernels import dequantize
from quant import QuantLinear

# ----------------------------------------------------------------------------------------------------
# Configuration

@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    head_dim: int | None = None           # None: dim // n_heads
    bos_id: int | None = 1
    eos_id: int | list | None = 2
    extra: dict = field(default_factory=dict)  # HF config fields we carry over untouched

    def __post_init__(self):
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise UserError(f"hidden_size {self.dim} is not divisible by num_attention_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"num_attention_heads {self.n_heads} is not a multiple of "
                            f"num_key_value_heads {self.n_kv_heads}")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise UserError(f"config value {name}={v!r} must be a positive integer")
        if self.head_dim % 2:
            raise UserError(f"head_dim {self.head_dim} must be even for RoPE")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        need = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"]
        missing = [k for k in need if k not in cfg]
        if missing:
            raise UserError(f"config.json lacks {', '.join(missing)}: not a LLaMA config")
        # rope: older configs have rope_theta (+ rope_scaling); newer ones nest both in rope_parameters
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in (None, "default"):
                scaling = None
            elif kind != "llama3":
                raise UserError(f"rope scaling {kind!r} is not supported (only the default and 'llama3')")
        known = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                 "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                 "max_position_embeddings", "tie_word_embeddings", "head_dim", "bos_token_id", "eos_token_id",
                 "quantization", "architectures", "model_type", "torch_dtype", "dtype", "gguf_source"}
        return cls(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), rope_scaling=scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), head_dim=cfg.get("head_dim"),
            bos_id=cfg.get("bos_token_id"), eos_id=cfg.get("eos_token_id"),
            extra={k: v for k, v in cfg.items() if k not in known})

    def to_hf_config(self) -> dict:
        cfg = dict(self.extra)
        cfg.update({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size, "intermediate_size": self.hidden_dim, "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "hidden_act": "silu",
        })
        return cfg


# ----------------------------------------------------------------------------------------------------
# Layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalize in fp32 as HF does, then cast back
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/hd), with Meta's llama3 frequency scaling when configured."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))  # [hd/2]
    s = args.rope_scaling
    if s is not None:  # llama3: slow long-wavelength frequencies by `factor`, blend the middle band
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_ctx = s.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x, cos, sin):
    """HF rotate_half RoPE. x: [B, H, T, hd]; cos, sin: [T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def one_query_attention(q, k, v):
    """softmax(q k^T / sqrt(hd)) v for one query per row (a decode step, no mask), in fp32 like SDPA.
    q [B, H, 1, hd], k/v [B, KV, S, hd] (H a multiple of KV: grouped-query) -> [B, H, 1, hd]. Written as
    multiply-and-sum reductions so that inside a compiled decode step inductor fuses it with its neighbours;
    SDPA's CPU kernel is an opaque call of ~48 us here (SmolLM2, 2 threads), ~0.8 ms of a ~15 ms token."""
    B, H, _, hd = q.shape
    KV = k.shape[1]
    qg = q.view(B, KV, H // KV, 1, hd).float()                                # [B, KV, H/KV, 1, hd]
    scores = (qg * k[:, :, None].float()).sum(-1) * hd ** -0.5                # [B, KV, H/KV, S]
    y = (torch.softmax(scores, -1)[..., None] * v[:, :, None].float()).sum(-2)  # [B, KV, H/KV, hd]
    return y.to(v.dtype).view(B, H, 1, hd)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # [B, n_kv, max_seq, hd] when decoding

    def forward(self, x, cos, sin, start_pos=None, mask=None):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # [B, H, T, hd]
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if start_pos is not None:  # decoding: append to the cache, attend over everything so far
            if self.cache_k is None:
                raise RuntimeError("KV cache not set up: call model.setup_cache(batch, max_seq_len) first")
            self.cache_k[:B, :, start_pos:start_pos + T] = k
            self.cache_v[:B, :, start_pos:start_pos + T] = v
            k = self.cache_k[:B, :, :start_pos + T]                                    # [B, KV, S, hd]
            v = self.cache_v[:B, :, :start_pos + T]
        if T == 1 and mask is None and torch.compiler.is_compiling():  # a compiled decode step (generate.py)
            y = one_query_attention(q, k, v)  # [B, H, 1, hd]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_kv_heads != self.n_heads)  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, start_pos=None, mask=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


# ----------------------------------------------------------------------------------------------------
# The model

class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)  # [hd/2]
        # A tied head read from a GGUF's Q8_0 embedding, kept as its 8-bit codes (group 32) for one-row decode
        # steps (generate.lm_head): the embedding's own values, a quarter of an fp32 copy's bytes. Not saved.
        for name in ("head_codes", "head_scales", "head_biases"):
            self.register_buffer(name, None, persistent=False)
        self.grad_checkpointing = False
        self.quantization = None   # the checkpoint's "quantization" object when quantized
        self.source = None         # the path this model was loaded from
        self.gguf_path = None      # set when loaded from a GGUF file (export copies untouched tensors)

    # -- forward ---------------------------------------------------------------------------------------
    def rope(self, positions):
        """cos, sin [T, hd] for integer positions [T], computed in fp32 as HF does."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)                              # [T, hd]
        return emb.cos(), emb.sin()

    def hidden_states(self, tokens, start_pos=None, pad_mask=None, blocks_fn=None):
        """Final-normed hidden states [B, T, dim] (the head is applied by forward). `blocks_fn(layers, h, cos,
        sin, start_pos, mask, norm)`, if given, runs the stack of blocks and the final norm instead of calling
        them one by one (generate.py passes one for decode steps: a C++ call, or a compiled graph per block)."""
        B, T = tokens.shape
        s0 = 0 if start_pos is None else start_pos
        if s0 + T > self.args.max_seq_len:
            raise UserError(f"sequence of {s0 + T} tokens exceeds the model's context of {self.args.max_seq_len}")
        h = self.embed_tokens(tokens)                                        # [B, T, dim]
        cos, sin = self.rope(torch.arange(s0, s0 + T, device=tokens.device))
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        mask = None  # None: causal within these T tokens, or, for one token, everything in the cache
        if (start_pos is not None and T > 1) or pad_mask is not None:
            S = s0 + T
            q_pos = torch.arange(s0, S, device=tokens.device)
            mask = torch.arange(S, device=tokens.device)[None, :] <= q_pos[:, None]  # [T, S] causal
            mask = mask[None, None]                                                    # [1, 1, T, S]
            if pad_mask is not None:  # hide left padding; a query always sees itself (no empty rows)
                mask = mask & pad_mask[:, None, None, :S]
                mask = mask | (torch.arange(S, device=tokens.device)[None, :] == q_pos[:, None])
        if blocks_fn is not None:
            return blocks_fn(self.layers, h, cos, sin, start_pos, mask, self.norm)
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, start_pos, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, start_pos, mask)
        return self.norm(h)

    def forward(self, tokens, start_pos=None, pad_mask=None):
        return self.lm_head(self.hidden_states(tokens, start_pos, pad_mask))  # [B, T, vocab]

    def setup_cache(self, batch: int, max_seq_len: int):
        p = self.norm.weight  # the activations' dtype (the embedding may be stored narrower)
        for layer in self.layers:
            a = layer.self_attn
            a.cache_k = torch.zeros(batch, a.n_kv_heads, max_seq_len, a.head_dim, dtype=p.dtype, device=p.device)
            a.cache_v = torch.zeros_like(a.cache_k)

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.cache_k = layer.self_attn.cache_v = None

    # -- loading and saving ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, keep_quantized=False) -> "Transformer":
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path} does not exist")
        if path.is_file() and (path.suffix == ".gguf" or is_gguf(path)):
            model = _load_gguf(path, dtype, keep_quantized)
        elif path.is_dir():
            model = _load_hf_dir(path, dtype)
        else:
            raise UserError(f"{path} is neither a model directory (config.json + *.safetensors) nor a .gguf file")
        model.source = str(path)
        return model.eval()

    def save_pretrained(self, out_dir, tokenizer=None, max_shard_bytes=2 << 30):
        """config.json + model.safetensors (sharded with an index past max_shard_bytes), HF key names;
        quantized linears as <name>.qweight/.scales/.biases, and `tokenizer` (tokenizer.py's) beside them
        when given. Written to a temp dir, then renamed."""
        cfg = self.args.to_hf_config()
        if self.quantization is not None:
            cfg["quantization"] = dict(self.quantization)
        cfg["torch_dtype"] = str(next(self.parameters()).dtype).replace("torch.", "")
        if self.gguf_path is not None and Path(self.gguf_path).is_file():
            # remembered so a later GGUF export can copy the source's untouched tensors (the Q8_0 embedding)
            # and metadata again; merge.export_gguf still checks each tensor before copying its bytes
            src = Path(self.gguf_path).resolve()
            cfg["gguf_source"] = {"path": str(src), "bytes": src.stat().st_size}
        tensors = {}
        for k, v in self.state_dict().items():
            if self.args.tie_embeddings and k == "lm_head.weight":
                continue
            tensors[k if k.startswith("lm_head.") else "model." + k] = v.detach().contiguous()
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            shards, cur, size = [], {}, 0
            for k, v in tensors.items():
                n = v.numel() * v.element_size()
                if cur and size + n > max_shard_bytes:
                    shards.append(cur)
                    cur, size = {}, 0
                cur[k], size = v, size + n
            shards.append(cur)
            if len(shards) == 1:
                save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            else:
                index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
                         "weight_map": {}}
                for i, shard in enumerate(shards):
                    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    save_file(shard, str(tmp / name), metadata={"format": "pt"})
                    index["weight_map"].update({k: name for k in shard})
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            if tokenizer is not None:
                tokenizer.save(tmp)
        return Path(out_dir)


# ----------------------------------------------------------------------------------------------------
# Hugging Face directories and this project's checkpoints

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: a model directory needs config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map")
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise UserError(f"{f} is listed in {index.name} but missing")
        return files
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} holds no *.safetensors weights")
    return files


def read_safetensors(files) -> dict[str, torch.Tensor]:
    """All tensors of the given files, memory-mapped (no copy until used). Corrupt files -> UserError."""
    out = {}
    for f in files:
        _check_safetensors_header(f)
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    out[k] = sf.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for corrupt headers/data
            raise UserError(f"cannot read {f}: {e}") from None
    return out


_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _check_safetensors_header(f: Path):
    """Validate a safetensors header before any allocation: its length, JSON, dtypes, and that every
    tensor's declared shape fits its byte range and every range lies inside the file."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserError(f"{f} is truncated ({size} bytes): not a safetensors file")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100 << 20):
            raise UserError(f"{f}: header length {n} exceeds the file ({size} bytes): truncated or corrupt")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{f}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{f}: header is not a JSON object")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(s) for s in shape)
            ok = (dtype in _ST_DTYPES and all(isinstance(s, int) and s >= 0 for s in shape)
                  and isinstance(a, int) and isinstance(b, int) and 0 <= a <= b <= data_size
                  and b - a == numel * _ST_DTYPES[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"{f}: tensor {name!r} has an invalid header entry {info!r} "
                            f"(data section is {data_size} bytes): truncated or corrupt file")


def _load_hf_dir(path: Path, dtype) -> Transformer:
    cfg = _read_json(path / "config.json")
    args = ModelArgs.from_hf_config(cfg)
    tensors = read_safetensors(_safetensors_files(path))
    sd = {}
    for k, v in tensors.items():
        if "rotary_emb" in k:
            continue  # old checkpoints store inv_freq; we compute it
        sd[k[len("model."):] if k.startswith("model.") else k] = v
    _check_sizes(args, sd, str(path))
    with torch.device("meta"):
        model = Transformer(args)
    quant = cfg.get("quantization")
    if quant is not None:
        _swap_for_quantized(model, quant)
    _assign_state_dict(model, sd, dtype, str(path))
    model.quantization = quant
    model.gguf_path = _gguf_source(cfg)
    return model


def _gguf_source(cfg: dict):
    """The GGUF file a saved checkpoint came from, if it is still there unchanged in size; else None."""
    src = cfg.get("gguf_source")
    try:
        p = Path(src["path"])
        return str(p) if p.is_file() and p.stat().st_size == int(src["bytes"]) else None
    except (TypeError, KeyError, ValueError, OSError):
        return None


def _swap_for_quantized(model: Transformer, quant: dict):
    """Replace every linear but the head by an (empty) QuantLinear, ready to receive stored codes (its
    constructor validates bits and group size)."""
    try:
        bits, group_size = int(quant["bits"]), int(quant["group_size"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"config.json: quantization {quant!r} needs integer 'bits' and 'group_size'") from None
    if quant.get("format", "affine") != "affine":
        raise UserError(f"quantization format {quant.get('format')!r} is not supported (only 'affine')")
    layers = quant.get("layers") or {}
    if not isinstance(layers, dict):
        raise UserError(f"config.json: quantization 'layers' must be an object, got {type(layers).__name__}")
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and child_name != "lm_head":
                full = f"{name}.{child_name}" if name else child_name
                own = layers.get(full) or {}
                try:
                    b, g = int(own.get("bits", bits)), int(own.get("group_size", group_size))
                except (TypeError, ValueError, AttributeError):
                    raise UserError(f"config.json: quantization of {full} {own!r} needs integer bits and group_size")
                with torch.device("meta"):
                    ql = QuantLinear(child.in_features, child.out_features, b, g, bias=child.bias is not None)
                ql.ggml_type = own.get("ggml_type")
                setattr(mod, child_name, ql)


def _check_sizes(args: ModelArgs, sd: dict, where: str):
    """Compare the declared sizes with the tensors present before building anything, so a corrupt or
    hostile config cannot make us allocate millions of layers (the detailed shape check follows later)."""
    layers = {k.split(".")[1] for k in sd if k.startswith("layers.")}
    if args.n_layers != len(layers):
        raise UserError(f"{where}: the config declares {args.n_layers} layers but the weights hold {len(layers)}")
    emb = sd.get("embed_tokens.weight")
    if emb is None:
        raise UserError(f"{where}: embed_tokens.weight is missing")
    if tuple(emb.shape) != (args.vocab_size, args.dim):
        raise UserError(f"{where}: embed_tokens.weight has shape {tuple(emb.shape)}, the config implies "
                        f"({args.vocab_size}, {args.dim})")


def _assign_state_dict(model: Transformer, sd: dict, dtype, where: str):
    """Move loaded tensors into the meta-initialized model without a second copy. Float tensors are cast
    to `dtype`; integer codes and the float32 quantization scales/biases keep their dtype."""
    expected = model.state_dict()
    if model.args.tie_embeddings:
        expected.pop("lm_head.weight", None)
        sd.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise UserError(f"{where}: weights do not match config.json (missing {missing[:3]}"
                        f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                        f"{'...' if len(unexpected) > 3 else ''})")
    out = {}
    for k, ref in expected.items():
        v = sd[k]
        if tuple(v.shape) != tuple(ref.shape):
            raise UserError(f"{where}: {k} has shape {tuple(v.shape)}, config.json implies {tuple(ref.shape)}")
        if v.is_floating_point() and not k.endswith((".scales", ".biases")):
            v = v.to(dtype)
        out[k] = v
    model.load_state_dict(out, strict=False, assign=True)
    if model.args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(model.args)


# ----------------------------------------------------------------------------------------------------
# GGUF (llama.cpp): reading and decoding in gguf_codec.py

def _load_gguf(path: Path, dtype, keep_quantized: bool) -> Transformer:
    with warnings.catch_warnings():  # the reader's arrays are read-only memory maps; we only read them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return _load_gguf_tensors(path, dtype, keep_quantized)


def _load_gguf_tensors(path: Path, dtype, keep_quantized: bool) -> Transformer:
    reader = gguf_reader(path)
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    g = lambda k, d=None: gguf_field(reader, f"llama.{k}", d)  # noqa: E731
    tensors = {t.name: t for t in reader.tensors}
    if "blk.0.attn_q.weight" not in tensors or "token_embd.weight" not in tensors:
        raise UserError(f"{path}: no llama weights found (blk.0.attn_q.weight / token_embd.weight)")
    need = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count"]
    bad = [k for k in need if not isinstance(g(k), int) or g(k) <= 0]
    if bad:
        raise UserError(f"{path}: metadata lacks positive integer llama.{', llama.'.join(bad)}")
    n_heads = g("attention.head_count")
    n_kv = g("attention.head_count_kv", n_heads)
    dim = g("embedding_length")
    vocab = int(tensors["token_embd.weight"].shape[1])
    if g("rope.scaling.type") not in (None, "none", "linear") and "rope_freqs.weight" not in tensors:
        raise UserError(f"{path}: rope scaling {g('rope.scaling.type')!r} is not supported")
    if g("rope.scaling.type") == "linear":
        raise UserError(f"{path}: linear rope scaling is not supported")
    args = ModelArgs(
        dim=dim, n_layers=g("block_count"), n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
        hidden_dim=g("feed_forward_length"), norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)), rope_scaling=None,
        max_seq_len=int(g("context_length", 2048)), tie_embeddings="output.weight" not in tensors,
        head_dim=g("attention.key_length") or (dim // n_heads if n_heads else None),
        bos_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=gguf_field(reader, "tokenizer.ggml.eos_token_id"))
    layers = {n.split(".")[1] for n in tensors if n.startswith("blk.")}
    if args.n_layers != len(layers):
        raise UserError(f"{path}: llama.block_count is {args.n_layers} but the file holds {len(layers)} blocks")
    if int(tensors["token_embd.weight"].shape[0]) != args.dim:
        raise UserError(f"{path}: llama.embedding_length is {args.dim} but token_embd.weight has "
                        f"{int(tensors['token_embd.weight'].shape[0])} columns")
    with torch.device("meta"):
        model = Transformer(args)
    sd, quantized = {}, {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue
        try:
            ours = gguf_to_ours(name)
        except (KeyError, IndexError):
            raise UserError(f"{path}: unexpected tensor {name!r} for a llama model") from None
        heads = n_heads if ".q_proj." in ours else n_kv if ".k_proj." in ours else None
        tt = check_supported(t.tensor_type)
        if tt in FLOAT_TYPES:
            w = _gguf_float(t)
        else:
            n_cols = int(t.shape[0])  # GGUF lists the fastest dimension first: [in, out] for a linear
            try:
                codes, scales, biases, bits, group = decode_blocks(tt, t.data, n_cols)
            except UserError as e:
                raise UserError(f"{path}: tensor {name}: {e}") from None
            if heads:
                codes, scales, biases = (permute_qk(x, heads, inverse=True) for x in (codes, scales, biases))
            if keep_quantized and ours.endswith("_proj.weight"):
                quantized[ours[:-len(".weight")]] = (codes, scales, biases, bits, group, tt.name)
                continue
            if keep_quantized and ours == "embed_tokens.weight" and args.tie_embeddings and (bits, group) == (8, 32):
                model.head_codes, model.head_scales, model.head_biases = codes, scales.float(), biases.float()
            w = dequantize(codes, scales, biases, group)  # bit-exact to llama.cpp's own dequantization
        if heads and tt in FLOAT_TYPES:
            w = permute_qk(w, heads, inverse=True)
        sd[ours] = w
    if "rope_freqs.weight" in tensors:  # llama3-style models: per-frequency divisors, as llama.cpp applies
        model.rope_freq_factors = torch.from_numpy(np.asarray(tensors["rope_freqs.weight"].data)).float()
    for name, (codes, scales, biases, bits, group, ggml_type) in quantized.items():
        parent, child = name.rsplit(".", 1)
        ql = QuantLinear.from_codes(codes, scales, biases, bits=bits, group_size=group)
        ql.ggml_type = ggml_type
        setattr(model.get_submodule(parent), child, ql)
        for k, v in ql.state_dict().items():
            sd[f"{name}.{k}"] = v
    _assign_state_dict(model, sd, dtype, str(path))
    if getattr(model, "rope_freq_factors", None) is not None:
        model.inv_freq = model.inv_freq / model.rope_freq_factors
    if quantized:
        model.quantization = quantization_config(model, method="gguf")
    model.gguf_path = str(path)
    return model


def _gguf_float(t):
    """An F32/F16/BF16 GGUF tensor as a torch tensor, [out, in] for a matrix."""
    if t.tensor_type == QT.BF16:
        w = torch.from_numpy(np.ascontiguousarray(t.data).view(np.uint16)).view(torch.bfloat16)
        return w.reshape(*[int(s) for s in reversed(t.shape)])
    w = torch.from_numpy(np.asarray(t.data))
    return w.float() if t.tensor_type == QT.F16 else w


def quantization_config(model, method):
    """config.json's "quantization": the most common bits and group size, "layers" with each quantized linear's
    own where any differs or came from a GGUF type (MLX's config spells out the odd layers the same way)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        return None
    kinds = [(m.bits, m.group_size) for m in layers.values()]
    bits, group = max(set(kinds), key=kinds.count)
    cfg = {"bits": bits, "group_size": group, "method": method, "format": "affine"}
    per = {n: {"bits": m.bits, "group_size": m.group_size, **({"ggml_type": m.ggml_type} if m.ggml_type else {})}
           for n, m in layers.items() if (m.bits, m.group_size) != (bits, group) or m.ggml_type}
    if per:
        cfg["layers"] = per
    return cfg
