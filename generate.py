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

from model import ArgumentParser, Transformer, UserError, embedded_model_path, run_cli


# -----------------------------------------------------------------------------
# compiled decode steps
#
# Run eagerly, a one-token step of SmolLM2 is ~1,400 small PyTorch calls (30 blocks x 7 linears, norms,
# RoPE, attention): the Python and dispatch overhead of each (~5-40 us) costs more than the arithmetic.
# With compile=True each block of a decode step is one torch.compile graph, shared by all blocks (they
# have the same shapes), so it compiles once (with the head, 5.5-8 s for SmolLM2; torch's disk cache helps
# later runs a little). Shapes are static except the position (dynamic from the start) and the KV cache
# size, which becomes dynamic when a later session allocates another size (one recompile). kernels.freeze
# resolves each QuantLinear's kernel and derived tensors beforehand, since the kernels' caches cannot be
# traced, and fuses q/k/v and gate/up into one matmul each (model.project). Inside the graph attention is
# model.one_query_attention, not an SDPA call; the head of a one-row step is a compiled multiply-and-sum
# (lm_head below). The prompt (prefill) runs eagerly. In fp32 the greedy tokens equal the eager ones; in
# bf16 they differ by rounding (tests/test_generate.py).

_block_step = None


def compiled_block_fn():
    """block_fn for model.hidden_states: one compiled graph shared by every block (None when compiling
    is switched off with QALORA_COMPILE=0)."""
    global _block_step
    import kernels
    if not kernels.COMPILE:
        return None
    if _block_step is None:
        def block_step(layer, h, cos, sin, positions, mask):
            return layer(h, cos, sin, positions.shape[0], mask)
        compiled = kernels.compile_fn(block_step, dynamic=None)  # None: dims become dynamic when they change

        def run(layer, h, cos, sin, start_pos, mask):
            # the position travels as the length of an empty tensor marked dynamic: dynamo compiles a Python
            # int as a constant first and recompiles when it changes (SmolLM2: one ~3-6 s compile more)
            positions = torch.empty(start_pos, 0)
            torch._dynamo.maybe_mark_dynamic(positions, 0)
            return compiled(layer, h, cos, sin, positions, mask)
        _block_step = run
    return _block_step


_head_gemv = None


def _one_row_matmul(h, w):
    """h [1, K] @ w^T [N, K] as a multiply-and-sum in fp32, rounded once to h's dtype."""
    return (h.float()[:, None, :] * w.float()).sum(-1).to(h.dtype)  # [1, N]


def lm_head(model, h, compiled=False):
    """model.lm_head(h) for h [M, dim]. compiled=True and one row: a compiled multiply-and-sum, which
    streams the head's weights near memory speed where BLAS's one-row kernels do not (SmolLM2's 49152 x 576
    head, 2 threads: fp32 9.7 -> 2.7 ms, bf16 3.3 -> 1.5 ms per token). Same weights; the sum's order differs."""
    global _head_gemv
    import kernels
    head = model.lm_head
    if not (compiled and kernels.COMPILE and h.shape[0] == 1 and type(head) is torch.nn.Linear and head.bias is None):
        return head(h)
    if _head_gemv is None:
        _head_gemv = kernels.compile_fn(_one_row_matmul, dynamic=False)
    return _head_gemv(h, head.weight)


@contextlib.contextmanager
def decode_session(model, batch, max_len, compile=False):
    """A KV cache for `batch` rows of up to `max_len` positions, and the block_fn for the one-token steps
    (None unless compile=True: eager). Everything is undone on exit."""
    import kernels
    block_fn = compiled_block_fn() if compile else None
    model.setup_cache(batch, max_len)
    if block_fn is not None:
        kernels.freeze(model, next(model.parameters()).dtype)
    try:
        yield block_fn
    finally:
        model.clear_cache()
        kernels.unfreeze(model)


@torch.no_grad()
def generate(model, ids, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, generator=None,
             use_cache=True, compile=False, on_token=None) -> list[int]:
    """Continue one prompt; returns the new ids only (stops after eos_id). compile=True compiles the
    one-token decode steps (see above; needs use_cache). on_token(id), if given, is called for each new id."""
    ids = list(ids)
    if not ids:
        raise UserError("the prompt is empty")
    if len(ids) > model.args.max_seq_len:
        raise UserError(f"the prompt has {len(ids)} tokens, more than the model's context of "
                        f"{model.args.max_seq_len}")
    total = min(len(ids) + max_new_tokens, model.args.max_seq_len)
    new = []
    session = decode_session(model, 1, total, compile) if use_cache else contextlib.nullcontext()
    with session as block_fn:
        tokens, pos = torch.tensor([ids]), 0
        while len(ids) < total:
            if use_cache:
                h = model.hidden_states(tokens, start_pos=pos, block_fn=block_fn if pos else None)  # prefill eager
                logits = lm_head(model, h[0, -1:], block_fn is not None)[0]  # [vocab]: last position only
                pos += tokens.shape[1]
            else:
                logits = model(torch.tensor([ids]))[0, -1]
            nxt = sample(logits, temperature, top_k, generator)
            ids.append(nxt)
            new.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if eos_id is not None and nxt == eos_id:
                break
            tokens = torch.tensor([[nxt]])
    return new


def sample(logits, temperature=0.0, top_k=None, generator=None) -> int:
    if temperature <= 0:
        return int(logits.float().argmax())  # fp32: 60 us for SmolLM2's 49K logits, bf16's argmax takes 180
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, eos_id=None, compile=False) -> list[list[int]]:
    """Greedy continuation of several prompts at once: left-padded, pad keys masked, one KV cache.
    RoPE depends only on relative positions, so left padding does not change a row's logits."""
    if not prompts:
        return []
    B, L = len(prompts), max(len(p) for p in prompts)
    total = min(L + max_new_tokens, model.args.max_seq_len)
    if L > model.args.max_seq_len:
        raise UserError(f"a prompt has {L} tokens, more than the model's context of {model.args.max_seq_len}")
    tokens = torch.zeros(B, L, dtype=torch.long)
    pad_mask = torch.zeros(B, total, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p)
        pad_mask[i, L - len(p):] = True
    pad_mask[:, L:] = True
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    with decode_session(model, B, total, compile) as block_fn:
        pos = 0
        while pos + tokens.shape[1] <= total:
            h = model.hidden_states(tokens, start_pos=pos, pad_mask=pad_mask[:, :pos + tokens.shape[1]],
                                    block_fn=block_fn if pos else None)[:, -1]  # prefill eager
            logits = lm_head(model, h, block_fn is not None)                   # [B, V]: the head only where needed
            pos += tokens.shape[1]
            nxt = logits.argmax(-1)                                                                     # [B]
            for i in range(B):
                if not done[i]:
                    out[i].append(int(nxt[i]))
                    done[i] = eos_id is not None and int(nxt[i]) == eos_id
            if bool(done.all()) or len(out[0]) >= max_new_tokens or pos >= total:
                break
            tokens = nxt[:, None]
    return out


def weight_bytes(model) -> int:
    """Bytes of weights read per decoded token: every parameter and buffer except the embedding table
    (one row of it is read) and the RoPE table."""
    seen, n = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or name == "inv_freq" or (name.startswith("embed_tokens") and not model.args.tie_embeddings):
            continue
        seen.add(id(t))
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
                   help="compile the one-token decode step (default; on SmolLM2 ~16-23 s the first time, ~4-5 s "
                        "once torch has cached it on disk, then ~3x the tokens/s of eager)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    if a.threads:
        torch.set_num_threads(a.threads)
    from tokenizer import load_tokenizer
    path = a.model or embedded_model_path()
    model = Transformer.from_pretrained(path, dtype=getattr(torch, a.dtype), keep_quantized=a.keep_quantized)
    tok = load_tokenizer(path)
    if a.adapter:
        from qalora import load_adapters
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
