"""
Evaluation of a model (float, quantized or merged checkpoint, or a GGUF file).

    python eval.py --model PATH --ppl FILE [--seq-len 256] [--max-windows N]

Perplexity: the text is tokenized without BOS and cut into consecutive non-overlapping
windows of seq_len tokens (a remainder shorter than a window is dropped); each window is
scored on its own, predicting tokens 2..seq_len from their prefixes, and

    ppl = exp( sum of -log p(token | prefix) over all predicted tokens / their number )

Each task is an optional flag and prints one JSON line; more tasks add flags beside --ppl.
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, ids, seq_len=256, max_windows=None, batch_size=4):
    """Perplexity of `ids` (list[int] or 1-D/2-D LongTensor) over non-overlapping windows of seq_len."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    assert n > 0, f"perplexity: {ids.numel()} tokens are less than one window of {seq_len}"
    windows = ids[: n * seq_len].view(n, seq_len)  # [n, T]
    nll, count = 0.0, 0
    for b in range(0, n, batch_size):
        x = windows[b:b + batch_size]  # [b, T]
        logits = model(x)  # [b, T, V]
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),  # [b*(T-1), V]
                               x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a model: perplexity (--ppl); one JSON line per task.")
    p.add_argument("--model", default=None, help="HF dir, checkpoint dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--keep-quantized", action="store_true", help="GGUF: keep Q4_1 linears quantized")
    p.add_argument("--ppl", default=None, metavar="FILE", help="text file to compute perplexity on")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per perplexity window")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)

    import data
    import model as model_lib
    import tokenizer as tokenizer_lib

    if args.ppl is None:
        raise model_lib.UserError("nothing to evaluate: pass a task, e.g. --ppl FILE")
    if args.seq_len < 2:
        raise model_lib.UserError(f"--seq-len {args.seq_len} is too short; a window needs at least 2 tokens")
    if args.max_windows is not None and args.max_windows < 1:
        raise model_lib.UserError(f"--max-windows {args.max_windows} must be at least 1")
    path = args.model or model_lib.embedded_model_path()
    model = model_lib.Transformer.from_pretrained(path, keep_quantized=args.keep_quantized)
    tok = tokenizer_lib.load_tokenizer(path)

    if args.ppl is not None:
        windows = data.perplexity_windows(tok, args.ppl, seq_len=args.seq_len, max_windows=args.max_windows)
        t0 = time.time()
        ppl = perplexity(model, windows, args.seq_len, batch_size=args.batch_size)
        print(json.dumps({"task": "ppl", "file": args.ppl, "ppl": round(ppl, 4),
                          "n_tokens": windows.shape[0] * (args.seq_len - 1), "windows": windows.shape[0],
                          "seq_len": args.seq_len, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    from model import run_cli
    run_cli(main)
