"""QA-LoRA adapters (Xu et al. 2023, arXiv 2309.14717) and the plain-LoRA baseline they extend.

A quantized linear holds w~[o, i] = scales[o, g(i)] * q[o, i] + biases[o, g(i)]. LoRA trains
y = base(x) + s * B(A(dropout(x))) with A: in -> r, B: r -> out (zeros), s = alpha / r. QA-LoRA feeds the
adapter the group-pooled input instead, so A: n_groups -> r:

    y = base(x) + s * B(A(dropout(c * pool(x))))      pool: [.., in] -> [.., n_groups], mean per quant group

Its update is then constant within each (row, group) and folds exactly into the biases (merge.py),
whatever the constant c_g, the `pool_scale`:

    mean     c_g = 1          the official code (nn.AvgPool1d)
    sum      c_g = g          the paper's Algorithm 1 (the mean times D_in // L, the group size)
    sqrt     c_g = sqrt(g)    keeps the input's RMS when a group's channels are uncorrelated
    ngroups  c_g = n_groups   PEFT's use_qalora (the mean times in_features // group_size)

with g each group's own width (a short last group uses its own). The merge absorbs c, but AdamW is not
scale-invariant in its input: c decides which learning rate trains the adapter well. The default, sum at
lr 6e-4, was chosen by experiment on a validation split (sweep.py, docs/pooling.md).
A starts as nn.Linear's Kaiming uniform (init "kaiming", as PEFT) or xavier uniform (the official code).
The pooled width caps the useful rank: rank(B @ A) <= n_groups (SmolLM2 at group 32: 576 / 32 = 18).
"""
import hashlib
import json
import os
import warnings

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from cli import UserError, atomic_path
from kernels import group_widths, pool_groups
from quant import QuantLinear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POOL_SCALES = ("mean", "sum", "sqrt", "ngroups")
DEFAULT_POOL_SCALE = "sum"  # chosen by sweep.py on a validation split (docs/pooling.md)
INITS = ("kaiming", "xavier")


def pool_constants(widths, kind):
    """c [n_groups]: what each group's mean is multiplied by before the adapter reads it."""
    if kind not in POOL_SCALES:
        raise UserError(f"unknown pool scale {kind!r}: choose one of {', '.join(POOL_SCALES)}")
    return {"mean": torch.ones_like(widths), "sum": widths, "sqrt": widths.sqrt(),
            "ngroups": torch.full_like(widths, len(widths))}[kind]


class LoRALinear(nn.Module):
    """Plain LoRA on a (quantized or float) linear: the QLoRA-style baseline. B @ A is a dense update, which
    can only be merged by dequantizing and quantizing again."""

    def __init__(self, base, rank, alpha, dropout=0.0, init="kaiming", in_width=None):
        super().__init__()
        if init not in INITS:
            raise UserError(f"unknown adapter init {init!r}: choose one of {', '.join(INITS)}")
        self.base, self.rank, self.alpha, self.scaling = base, rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_width or base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        if init == "xavier":
            nn.init.xavier_uniform_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)  # starts as a zero update

    def adapter_input(self, x):
        return x

    def forward(self, x):
        y = self.base(x)
        a = self.lora_A(self.dropout(self.adapter_input(x)).to(self.lora_A.weight.dtype))
        return y + (self.scaling * self.lora_B(a)).to(y.dtype)


class QALoRALinear(LoRALinear):
    """A frozen QuantLinear plus a low-rank adapter on its group-pooled input."""

    def __init__(self, base: QuantLinear, rank, alpha, dropout=0.0, init="kaiming", pool_scale="mean"):
        super().__init__(base, rank, alpha, dropout, init, in_width=base.n_groups)
        widths = group_widths(base.in_features, base.group_size, dtype=torch.float64)
        self.pool_scale = pool_scale
        self.register_buffer("pool_c", pool_constants(widths, pool_scale), persistent=False)  # [n_groups]

    def adapter_input(self, x):
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()  # pool bf16/f16 inputs in f32
        return pool_groups(xf, self.base.group_size) * self.pool_c.to(xf.dtype)  # [..., n_groups]


def adapter_layers(model):
    """[(name, module)] of every adapter in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_adapters(model, rank, alpha, dropout=0.0, targets=TARGETS, method="qalora", pool_scale=DEFAULT_POOL_SCALE,
                 init="kaiming", exclude=()):
    """Wrap every target linear (never lm_head, nor the names in `exclude`) in place, freeze everything else,
    return the adapter params."""
    if method not in ("qalora", "lora"):
        raise UserError(f"unknown adapter method {method!r}: use 'qalora' or 'lora'")
    pool_constants(torch.ones(1), pool_scale)  # bad names fail before anything is wrapped
    if init not in INITS:
        raise UserError(f"unknown adapter init {init!r}: choose one of {', '.join(INITS)}")
    if rank < 1:
        raise UserError(f"adapter rank must be >= 1, got {rank}")
    if adapter_layers(model):
        raise UserError("the model already has adapters: merge or reload it before adding new ones")
    found = [(n, m) for n, m in model.named_modules()
             if n.split(".")[-1] in targets and n != "lm_head" and n not in exclude
             and isinstance(m, (QuantLinear, nn.Linear))]
    if not found:
        raise UserError(f"no linear layer named any of {list(targets)} to adapt")
    floats = [n for n, m in found if not isinstance(m, QuantLinear)]
    if method == "qalora" and floats:
        raise UserError(f"QA-LoRA adapts quantized layers but {floats[0]} ({len(floats)} in all) is float: quantize "
                        f"the model first (quantize.py) or load a quantized GGUF with keep_quantized=True")
    for p in model.parameters():
        p.requires_grad_(False)
    params, capped = [], set()
    for name, mod in found:
        if method == "qalora":
            adapter = QALoRALinear(mod, rank, alpha, dropout, init, pool_scale)
            if rank > mod.n_groups:
                capped.add(mod.n_groups)
        else:
            adapter = LoRALinear(mod, rank, alpha, dropout, init)
        ref = mod.scales if isinstance(mod, QuantLinear) else mod.weight
        for lin in (adapter.lora_A, adapter.lora_B):  # move/cast the adapter only, never the base
            lin.to(ref.device, torch.float64 if ref.dtype == torch.float64 else torch.float32)
        model.set_submodule(name, adapter.train(model.training))
        params += [adapter.lora_A.weight, adapter.lora_B.weight]
    if capped:
        warnings.warn(f"rank {rank} exceeds the pooled width {min(capped)} of some layers: "
                      f"rank(B @ A) <= n_groups, so the extra rank there is wasted")
    model.adapter_config = dict(method=method, rank=rank, alpha=alpha, dropout=dropout, targets=list(targets),
                                pool_scale=pool_scale if method == "qalora" else None, init=init,
                                exclude=sorted(exclude))
    return params


# ----------------------------------------------------------------------------------------------------
# saving and loading: adapter.safetensors (the A and B matrices) and adapter.json (how to rebuild them)

def base_fingerprint(model):
    """sha256 over every adapted base layer's name, shapes, dtypes and bytes (codes, scales, biases, bias).
    The biases are included on purpose: a merged model has other biases, so an adapter cannot be loaded (and
    merged a second time) onto the model it was already merged into."""
    h = hashlib.sha256()
    for name, layer in adapter_layers(model):
        for key, t in sorted(layer.base.state_dict().items()):
            t = t.detach().contiguous().cpu()
            h.update(f"{name}.{key}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _quant_meta(model):
    """{"bits", "group_size"} shared by every adapted layer, or both None and "layer_quant": {name: [bits, group]}
    when the layers differ (a mixed GGUF such as Q4_K_M)."""
    q = {n: [m.base.bits, m.base.group_size] for n, m in adapter_layers(model) if isinstance(m.base, QuantLinear)}
    kinds = {tuple(v) for v in q.values()}
    if len(kinds) > 1:
        return dict(bits=None, group_size=None, layer_quant=q)
    bits, group_size = kinds.pop() if kinds else (None, None)
    return dict(bits=bits, group_size=group_size)


def save_adapters(model, out_dir):
    """Write out_dir/adapter.safetensors (only the adapter tensors) and out_dir/adapter.json."""
    layers = adapter_layers(model)
    if not layers:
        raise UserError("the model has no adapters to save")
    tensors = {f"{name}.{part}.weight": getattr(m, part).weight.detach().contiguous().cpu()
               for name, m in layers for part in ("lora_A", "lora_B")}
    meta = dict(model.adapter_config, **_quant_meta(model),
                fingerprint=base_fingerprint(model), layers=[n for n, _ in layers])
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, "adapter.safetensors")) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(os.path.join(out_dir, "adapter.json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")


def read_adapter_config(adapter_dir):
    """adapter.json; files written before pool_scale and init existed hold a mean-pooled, Kaiming adapter."""
    path = os.path.join(adapter_dir, "adapter.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: pass a directory written by save_adapters")
    with open(path) as f:
        cfg = json.load(f)
    cfg.setdefault("pool_scale", "mean" if cfg.get("method") == "qalora" else None)
    cfg.setdefault("init", "kaiming")
    cfg.setdefault("exclude", [])
    return cfg


def load_adapters(model, adapter_dir):
    """Add adapters as recorded in adapter_dir (or check the existing ones match) and load their weights.
    Refuses (UserError) an adapter trained on another base (fingerprint), or of another kind."""
    cfg = read_adapter_config(adapter_dir)
    if not adapter_layers(model):
        add_adapters(model, cfg["rank"], cfg["alpha"], cfg["dropout"], tuple(cfg["targets"]), cfg["method"],
                     pool_scale=cfg["pool_scale"] or DEFAULT_POOL_SCALE, init=cfg["init"], exclude=tuple(cfg["exclude"]))
    have = model.adapter_config
    for key in ("method", "rank", "alpha", "pool_scale"):
        if have[key] != cfg[key]:
            raise UserError(f"{adapter_dir} holds a {key}={cfg[key]!r} adapter but the model's adapters have "
                            f"{key}={have[key]!r}: load it onto a model without adapters")
    if [n for n, _ in adapter_layers(model)] != cfg["layers"]:
        raise UserError(f"{adapter_dir} adapts other layers ({len(cfg['layers'])}, first {cfg['layers'][0]}) than "
                        f"the model has ({len(adapter_layers(model))}): check the targets and the base model")
    if base_fingerprint(model) != cfg["fingerprint"]:
        q = _quant_meta(model)
        raise UserError(f"{adapter_dir} was trained on another base model (fingerprint mismatch; adapter: "
                        f"bits={cfg['bits']} group_size={cfg['group_size']}, model: bits={q['bits']} "
                        f"group_size={q['group_size']}); "
                        f"load the exact quantized base it was trained on (not a merged one)")
    tensors = load_file(os.path.join(adapter_dir, "adapter.safetensors"))
    params = []
    for name, m in adapter_layers(model):
        for part in ("lora_A", "lora_B"):
            w = getattr(m, part).weight
            t = tensors.get(f"{name}.{part}.weight")
            if t is None or t.shape != w.shape:
                raise UserError(f"{adapter_dir}: {name}.{part}.weight is missing or has shape "
                                f"{None if t is None else tuple(t.shape)}, expected {tuple(w.shape)}")
            with torch.no_grad():
                w.copy_(t)
            params.append(w)
    model.adapter_config = {k: cfg[k] for k in ("method", "rank", "alpha", "dropout", "targets", "pool_scale", "init",
                                                "exclude")}
    return params
