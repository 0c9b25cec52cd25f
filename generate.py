"""Sampling from a model: greedy (temperature 0) or temperature/top-k, with a KV cache.

    python generate.py --model PATH --prompt "Once upon a time" --max-new-tokens 64 --temperature 0
    python generate.py --model PATH --adapter DIR --prompt ...      (a base with a trained adapter, unmerged)

Prints prompt + continuation on stdout and the speed on stderr: tokens/s after the first three tokens (the
prompt, and compiling the decode step) and GB/s of weights read per token (every decoded token reads every
weight once, so GB/s = weight bytes x tokens/s).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

import kernels
import quant
from cli import ArgumentParser, UserError, embedded_model_path, run_cli
from model import Transformer
from qalora import load_adapters
from tokenizer import load_tokenizer


# -----------------------------------------------------------------------------
# decode steps
#
# Run eagerly, a one-token step of SmolLM2 is ~1,400 small PyTorch calls (30 blocks x 7 linears, norms,
# RoPE, attention): the Python and dispatch overhead of each costs more than the arithmetic. With
# compile=True the one-token step of a run of consecutive blocks whose seven linears are plain quantized ones
# (no adapter, no bias) is one C++ call, kernels.decode_step: for every block the norms, RoPE, the KV cache,
# attention and the seven gemvs (the same gemv as QuantLinear's forward), in one parallel region. Any other
# block (an unmerged adapter, float linears, a batch with padding) runs as one torch.compile graph, shared by
# all blocks (they have the same shapes), so it compiles once; its shapes are static except the position
# (dynamic from the start) and the KV cache size, which becomes dynamic when a later session allocates
# another size (one recompile). Inside the graph the quantized linears call the C++ gemv as an opaque
# operator and attention is model.one_query_attention. The head of a one-row step is the gemv over a GGUF's
# Q8_0 codes, else a compiled multiply-and-sum (lm_head below). The prompt (prefill) runs eagerly. In fp32
# the greedy tokens equal the eager ones; in bf16 they differ by rounding (tests/test_generate.py).

_compiled = {}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # kernels.decode_step's order


def native_linears(layer, dtype):
    """The block's seven linears when kernels.decode_step can run its one-token step (plain quantized linears
    on the gemv, without bias, adapter or an explicit impl; fp32 or bf16 activations; one eps for both
    norms), else None."""
    mods = [layer.get_submodule(n) for n in LINEARS]
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    ok = (dtype in (torch.float32, torch.bfloat16) and kernels.gemv_available()
          and all(type(m) is quant.QuantLinear and m.bias is None and m.impl in ("auto", "gemv")
                  and m.scales.dtype == m.biases.dtype == torch.float32 for m in mods)
          and all(n.weight.dtype == dtype for n in norms) and norms[0].eps == norms[1].eps)
    return mods if ok else None


def decode_runs(layers, dtype, norm):
    """The blocks in order as runs: (layers, packed, n_heads, eps) for consecutive blocks that
    kernels.decode_step runs as one call (same heads and eps), (layers, None, None, None) for one that runs
    as the compiled graph. The last run also applies the final norm when it is a decode_step run (same eps
    and dtype); whether it does is returned beside the runs. Reads each block's KV cache, so made once the
    session's cache exists."""
    runs = []
    for layer in layers:
        lins, a = native_linears(layer, dtype), layer.self_attn
        key = (a.n_heads, layer.input_layernorm.eps)
        if lins is None:
            runs.append(([layer], None, None, None))
            continue
        block = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight, lins, a.cache_k, a.cache_v)
        if runs and runs[-1][1] is not None and runs[-1][2:] == key:
            runs[-1][0].append(layer)
            runs[-1][1].append(block)
        else:
            runs.append(([layer], [block], *key))
    fold = runs[-1][1] is not None and norm.eps == runs[-1][3] and norm.weight.dtype == dtype
    return [(ls, None if blocks is None else kernels.pack_blocks(blocks, norm.weight if fold and i == len(runs) - 1 else None),
             heads, eps) for i, (ls, blocks, heads, eps) in enumerate(runs)], fold


def compiled_blocks_fn():
    """blocks_fn for model.hidden_states' one-token steps in one decode session: kernels.decode_step for each
    run of blocks that allows it, else one compiled graph per block, shared by every block and session (None
    when compiling is switched off with QALORA_COMPILE=0). The runs are found once per session."""
    if not kernels.COMPILE:
        return None
    runs = {}  # activation dtype -> decode_runs, for this session

    def graph(layer, h, cos, sin, start_pos, mask):
        if "block" not in _compiled:  # made when first needed: a model of plain quantized blocks never
            def block_step(layer, h, cos, sin, positions, mask):  # imports the compiler (~1.4 s)
                return layer(h, cos, sin, positions.shape[0], mask)
            _compiled["block"] = kernels.compile_fn(block_step, dynamic=None)  # None: dims turn dynamic on change
        # the position travels as the length of an empty tensor marked dynamic: dynamo compiles a Python
        # int as a constant first and recompiles when it changes
        positions = torch.empty(start_pos, 0)
        torch._dynamo.maybe_mark_dynamic(positions, 0)
        return _compiled["block"](layer, h, cos, sin, positions, mask)

    def run(layers, h, cos, sin, start_pos, mask, norm):
        if not (mask is None and h.shape[:2] == (1, 1) and h.device.type == "cpu"):
            for layer in layers:
                h = graph(layer, h, cos, sin, start_pos, mask)
            return norm(h)
        if h.dtype not in runs:
            runs[h.dtype] = decode_runs(layers, h.dtype, norm)
        steps, normed = runs[h.dtype]
        cos, sin = cos.contiguous(), sin.contiguous()
        for ls, packed, n_heads, eps in steps:
            if packed is not None:
                h = kernels.decode_step(h.contiguous(), packed, cos, sin, start_pos, n_heads, eps)
            else:
                h = graph(ls[0], h, cos, sin, start_pos, mask)
        return h if normed else norm(h)
    return run


def _one_row_matmul(h, w):
    """h [1, K] @ w^T [N, K] as a multiply-and-sum in fp32, rounded once to h's dtype."""
    return (h.float()[:, None, :] * w.float()).sum(-1).to(h.dtype)  # [1, N]


def lm_head(model, h, compiled=False):
    """model.lm_head(h) for h [M, dim]. A tied head kept as Q8_0 codes (model.head_codes) and a few rows: the
    gemv over those codes. Else, compiled=True and one row of a float head: a compiled multiply-and-sum, which
    streams the head's weights near memory speed where BLAS's one-row kernels do not."""
    if model.head_codes is not None and h.shape[0] <= kernels.GEMV_MAX_M and kernels.gemv_available():
        return kernels.gemv_codes(h, model.head_codes, model.head_scales, model.head_biases, 8, 32).to(h.dtype)
    head = model.lm_head
    if not (compiled and kernels.COMPILE and h.shape[0] == 1 and type(head) is torch.nn.Linear and head.bias is None):
        return head(h)
    if "head" not in _compiled:
        _compiled["head"] = kernels.compile_fn(_one_row_matmul, dynamic=False)
    return _compiled["head"](h, head.weight)


@contextlib.contextmanager
def decode_session(model, batch, max_len, compile=False):
    """A KV cache for `batch` rows of up to `max_len` positions, and the blocks_fn for the one-token steps
    (None unless compile=True: eager). The cache is freed on exit."""
    model.setup_cache(batch, max_len)
    try:
        yield compiled_blocks_fn() if compile else None
    finally:
        model.clear_cache()


WARM_STEPS = 2  # one-token steps with full guards before warmed_up()


def warmed_up():
    """After two one-token steps of a session, the graphs every block needs exist (those steps ran all guards
    and compiled whatever was missing: the shared block graph, one per kind of block in a mixed model, and
    the dims that turned dynamic on the second call), and nothing changes until the session ends: the
    model, the cache and the shapes are fixed, only the position and the mask's length move. So dynamo
    evaluates only the guards that tell its cached graphs apart, not all of them at each of the 30 block
    calls per token. A recompile under this stance raises (never a wrong graph), and generate_batch then
    returns to full guards."""
    if not _compiled or not hasattr(torch.compiler, "set_stance"):  # no graph made: nothing to guard
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def sample(logits, temperature=0.0, top_k=None, generator=None) -> int:
    """One token id from logits [vocab]: the argmax at temperature 0, else softmax(logits / T) (top-k)."""
    if temperature <= 0:
        return int(logits.float().argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, eos_id=None, temperature=0.0, top_k=None, generator=None,
                   compile=False, on_token=None, use_cache=True) -> list[list[int]]:
    """Continue several prompts at once; returns each one's new ids (a row stops after eos_id). Prompts are
    left-padded with the padding masked (RoPE sees relative positions only, so padding changes no row's
    logits), one KV cache for all. compile=True compiles the one-token steps (see above); use_cache=False
    recomputes every sequence from the start at each step (the reference for the cache). on_token(row, id),
    if given, is called for each new id."""
    if not prompts:
        return []
    if any(not p for p in prompts):
        raise UserError("a prompt is empty")
    B, L = len(prompts), max(len(p) for p in prompts)
    if L > model.args.max_seq_len:
        raise UserError(f"a prompt has {L} tokens, more than the model's context of {model.args.max_seq_len}")
    total = min(L + max_new_tokens, model.args.max_seq_len)
    tokens = torch.zeros(B, L, dtype=torch.long)
    pad_mask = torch.ones(B, total, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p)
        pad_mask[i, :L - len(p)] = False
    padded = not bool(pad_mask.all())
    out, done = [[] for _ in range(B)], [False] * B
    session = decode_session(model, B, total, compile) if use_cache else contextlib.nullcontext()
    with session as blocks_fn, contextlib.ExitStack() as stance:
        seq, pos = tokens, 0  # the tokens to run next, and the position of the first of them
        for step_no in range(total - L):
            if step_no == 1 + WARM_STEPS and blocks_fn is not None:  # after the prefill and the warm-up steps
                stance.enter_context(warmed_up())
            end = pos + seq.shape[1]
            mask = pad_mask[:, :end] if padded else None
            if use_cache:
                try:
                    h = model.hidden_states(seq, start_pos=pos, pad_mask=mask, blocks_fn=blocks_fn if pos else None)
                except RuntimeError as e:  # a graph was still missing: back to full guards, and the step again
                    if "skip_guard_eval_unsafe" not in str(e):  # (it rewrites the same cache entries)
                        raise
                    stance.close()
                    h = model.hidden_states(seq, start_pos=pos, pad_mask=mask, blocks_fn=blocks_fn)
                logits = lm_head(model, h[:, -1], blocks_fn is not None)  # [B, V]: the last position only
                pos = end
            else:  # everything so far, from the start
                logits = model(seq, pad_mask=mask)[:, -1]
            nxt = (logits.float().argmax(-1).tolist() if temperature <= 0 else
                   [sample(logits[i], temperature, top_k, generator) for i in range(B)])
            for i in range(B):
                if not done[i]:
                    out[i].append(nxt[i])
                    done[i] = eos_id is not None and nxt[i] == eos_id
                    if on_token is not None:
                        on_token(i, nxt[i])
            if all(done):
                break
            step = torch.tensor(nxt)[:, None]
            seq = step if use_cache else torch.cat([seq, step], dim=1)
    return out


def generate(model, ids, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, generator=None,
             use_cache=True, compile=False, on_token=None) -> list[int]:
    """Continue one prompt; returns the new ids only (stops after eos_id). on_token(id) per new id."""
    if len(ids) > model.args.max_seq_len:
        raise UserError(f"the prompt has {len(ids)} tokens, more than the model's context of "
                        f"{model.args.max_seq_len}")
    callback = (lambda _, t: on_token(t)) if on_token is not None else None
    return generate_batch(model, [list(ids)], max_new_tokens, eos_id, temperature, top_k, generator, compile,
                          callback, use_cache)[0]


def weight_bytes(model) -> int:
    """Bytes of weights read per decoded token: every parameter and buffer except the embedding table (one
    row of it is read; a tied head kept as Q8_0 codes reads those codes instead) and the RoPE table."""
    codes_head = model.head_codes is not None
    seen, n = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or name == "inv_freq":
            continue
        seen.add(id(t))
        if name.startswith("embed_tokens") and (codes_head or not model.args.tie_embeddings):
            continue
        if name == "lm_head.weight" and codes_head:
            continue
        n += t.numel() * t.element_size()
    return n


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF LLaMA dir, .gguf file or project checkpoint "
                   "(default: the embedded SmolLM2-135M-Instruct Q4_1 GGUF)")
    p.add_argument("--adapter", default=None, help="adapter directory written by train.py/save_adapters")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--keep-quantized", action=argparse.BooleanOptionalAction, default=True,
                   help="keep a GGUF's Q4_1 weights as 4-bit codes (default) instead of dequantizing")
    p.add_argument("--no-cache", action="store_true", help="recompute the full sequence every step")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="fast one-token steps (default): plain quantized blocks as one C++ call per token, any "
                        "other block (an unmerged adapter, float weights) as a compiled graph (compiling takes "
                        "~15-25 s the first time); on the embedded SmolLM2 ~2.5-3x the tokens/s of --no-compile")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    if a.threads:
        torch.set_num_threads(a.threads)
    path = a.model or embedded_model_path()
    model = Transformer.from_pretrained(path, dtype=getattr(torch, a.dtype), keep_quantized=a.keep_quantized)
    tok = load_tokenizer(path)
    if a.adapter:
        load_adapters(model, a.adapter)
        model.eval()
    ids = tok.encode(a.prompt)
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.perf_counter()
    stamps = []  # when each new token was ready
    new = generate(model, ids, a.max_new_tokens, a.temperature, a.top_k, tok.eos_id, g, use_cache=not a.no_cache,
                   compile=a.compile, on_token=lambda _: stamps.append(time.perf_counter()))
    dt = time.perf_counter() - t0
    print(a.prompt + tok.decode(new))
    # the first token pays for the prompt, the second for compiling the decode step and the head; the third is
    # left out too, so the line compares with runs made before the position was dynamic from the first compile
    warm = 3 if len(new) > 3 else 0
    start = stamps[warm - 1] if warm else t0  # when the timed tokens began
    steady = stamps[-1] - start if stamps else 0.0
    tps = (len(new) - warm) / steady if steady > 0 else float("inf")
    gb = weight_bytes(model) / 1e9
    first = f" (the first {warm} in {start - t0:.2f} s: prompt, compiling)" if warm else ""
    print(f"{len(new)} tokens in {dt:.2f} s{first}; {tps:.1f} tokens/s, {gb * tps:.2f} GB/s of weights "
          f"({gb * 1e3:.0f} MB read per token)", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
