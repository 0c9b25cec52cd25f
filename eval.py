"""
Evaluation of a model (float, quantized or merged checkpoint, or a GGUF file).

    python eval.py --model PATH --ppl FILE [--seq-len 256] [--max-windows N]

Perplexity: the text is tokenized without BOS and cut into consecutive non-overlapping
windows of seq_len tokens (a remainder shorter than a window is dropped); each window is
scored on its own, predicting tokens 2..seq_len from their prefixes, and

    ppl = exp( sum of -log p(token | prefix) over all predicted tokens / their number )

Each task is an optional flag and prints one JSON line; more tasks add flags beside --ppl.

    python eval.py --model PATH [--adapter DIR] --tasks arc_easy,arc_challenge,hellaswag,mmlu,synthetic
                   [--mmlu-shots 0|5] [--limit N] [--out FILE]

Multiple choice (ARC-Easy/Challenge, HellaSwag, MMLU) by summed log-likelihood of each choice given the
context, with lm-eval-harness's prompts and its length-normalized acc_norm; exact match and held-out loss
on the synthetic tasks of data.py. --limit N takes the first N items of ARC, HellaSwag and the synthetic
held-out split, and a seeded sample (--seed) of N questions across all subjects for MMLU. Every accuracy
comes with its standard error sqrt(p (1 - p) / n).
"""
import csv
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from cli import ArgumentParser, UserError, atomic_path, embedded_model_path, parse_jsonl, read_utf8, run_cli
from generate import generate_batch
from model import Transformer
from qalora import load_adapters
from quant import QuantLinear
from tokenizer import load_tokenizer


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



# =============================================================================
# multiple choice and exact match (lm-eval-harness conventions)
#
# A multiple-choice item is a context and n continuations; the model picks the
# continuation with the largest summed log-likelihood log p(delimiter + choice | context)
# ("acc"), or the largest log-likelihood per character of the choice ("acc_norm",
# lm-eval-harness's length normalization: len(choice), the delimiter not counted;
# reported for ARC and HellaSwag). Every accuracy comes with its standard error
# sqrt(p (1 - p) / n).

@dataclass
class MCItem:
    context: str           # ends where the answer starts, e.g. "...\nAnswer:"
    choices: list          # the answers as text: ["A", "B", ...] or ["cellular telephone", ...]
    gold: int              # index of the right choice
    delimiter: str = " "   # what joins context and choice (lm-eval-harness's target_delimiter)

    @property
    def continuations(self):
        """What is scored after the context: [" A", " B", ...]."""
        return [self.delimiter + c for c in self.choices]


def encode_pair(tok, context, continuation):
    """(context ids, continuation ids) as lm-eval-harness splits them: trailing spaces of the context move
    to the continuation, the whole string is encoded once and the continuation is what follows the
    context's own encoding (so a BPE merge across the boundary is seen as the model would see it)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    if not ctx:  # nothing to condition on: start from bos (or eos, as the harness does)
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        return [prefix], whole
    return ctx, whole[len(ctx):]


def _score(logp, cont):
    """(sum of log p(cont), all tokens greedy?) from logp [L, vocab] at cont's positions."""
    tgt = torch.tensor(cont)
    return logp.gather(1, tgt[:, None]).sum().item(), bool((logp.argmax(-1) == tgt).all())


@torch.no_grad()
def _loglikelihood_rows(model, requests, batch_size=16, max_batch_tokens=8192):
    """The reference path: each request is one row `(context + continuation)[:-1]` scored at the
    continuation's positions; the context is cut on the left if the row is longer than the model's
    context. Requests whose rows are the same token list share one row (all choices of an MMLU question:
    one-token continuations, so the row is the question itself). Rows are sorted by length and
    right-padded (causal attention: padding after a row cannot change it); the head runs only at the
    scored positions."""
    max_len = model.args.max_seq_len
    rows, where = {}, []                      # row tokens -> row index; per request (row, first pos, targets)
    for ctx, cont in requests:
        whole = (list(ctx) + list(cont))[-(max_len + 1):]
        inp = tuple(whole[:-1])
        r = rows.setdefault(inp, len(rows))
        where.append((r, len(inp) - len(cont), list(cont)))
    row_list = list(rows)
    by_row = [[] for _ in row_list]
    for i, (r, _, _) in enumerate(where):
        by_row[r].append(i)
    order = sorted(range(len(row_list)), key=lambda r: -len(row_list[r]))
    out = [None] * len(requests)
    i = 0
    while i < len(order):
        T = len(row_list[order[i]])
        b = max(1, min(batch_size, max_batch_tokens // T))
        chunk = order[i:i + b]
        i += b
        tokens = torch.zeros(len(chunk), T, dtype=torch.long)
        for j, r in enumerate(chunk):
            tokens[j, :len(row_list[r])] = torch.tensor(row_list[r])
        h = model.hidden_states(tokens)                                          # [b, T, dim]
        for j, r in enumerate(chunk):
            reqs = by_row[r]
            lo = min(where[k][1] for k in reqs)
            hi = max(where[k][1] + len(where[k][2]) for k in reqs)
            logp = torch.log_softmax(model.lm_head(h[j, lo:hi]).float(), dim=-1)  # [hi - lo, vocab]
            for k in reqs:
                _, p0, cont = where[k]
                out[k] = _score(logp[p0 - lo:p0 - lo + len(cont)], cont)
    return out


@torch.no_grad()
def _loglikelihood_shared(model, groups, batch_size=16):
    """The fast path for several continuations of one context (ARC, HellaSwag): each context runs once
    into the KV cache, its keys/values are copied to one cache row per continuation, and only the
    continuations run after it. Contexts of a batch are left-padded with their padding masked (RoPE
    sees relative positions only). groups: [(ctx, [(request index, cont)])], all fitting the context
    window. Returns {request index: (ll, greedy)}."""
    out = {}
    groups = sorted(groups, key=lambda g: -len(g[0]))
    i = 0
    while i < len(groups):
        chunk, n_rows = [], 0                     # groups of this batch: at most batch_size continuations
        while i < len(groups) and (not chunk or n_rows + len(groups[i][1]) <= batch_size):
            chunk.append(groups[i])
            n_rows += len(groups[i][1])
            i += 1
        L = max(len(ctx) for ctx, _ in chunk)
        Tc = max(len(c) for _, reqs in chunk for _, c in reqs)
        ctx_tok = torch.zeros(len(chunk), L, dtype=torch.long)
        ctx_mask = torch.zeros(len(chunk), L, dtype=torch.bool)
        for j, (ctx, _) in enumerate(chunk):
            ctx_tok[j, L - len(ctx):] = torch.tensor(ctx)
            ctx_mask[j, L - len(ctx):] = True
        gidx = torch.tensor([j for j, (_, reqs) in enumerate(chunk) for _ in reqs])  # [n_rows] row -> group
        conts = [c for _, reqs in chunk for _, c in reqs]
        cont_tok = torch.zeros(n_rows, Tc, dtype=torch.long)
        for r, c in enumerate(conts):
            cont_tok[r, :len(c)] = torch.tensor(c)                            # right-padded: causal, harmless
        model.setup_cache(n_rows, L + Tc)
        try:
            h_ctx = model.hidden_states(ctx_tok, start_pos=0, pad_mask=ctx_mask)[:, -1]  # [groups, dim]
            for layer in model.layers:                                        # the context's K/V, per row
                a = layer.self_attn
                a.cache_k[:n_rows, :, :L] = a.cache_k[:len(chunk), :, :L][gidx]
                a.cache_v[:n_rows, :, :L] = a.cache_v[:len(chunk), :, :L][gidx]
            mask = torch.cat([ctx_mask[gidx], torch.ones(n_rows, Tc, dtype=torch.bool)], dim=1)  # [n_rows, L+Tc]
            h_cont = model.hidden_states(cont_tok, start_pos=L, pad_mask=mask)  # [n_rows, Tc, dim]
        finally:
            model.clear_cache()
        idx = [k for _, reqs in chunk for k, _ in reqs]
        for r, (k, c) in enumerate(zip(idx, conts)):
            h = torch.cat([h_ctx[gidx[r]][None], h_cont[r, :len(c) - 1]])    # [len(c), dim]: predicts c
            out[k] = _score(torch.log_softmax(model.lm_head(h).float(), dim=-1), c)
    return out


LL_IMPLS = ("auto", "rows", "shared")


def loglikelihood_tokens(model, requests, batch_size=16, impl="auto"):
    """[(context ids, continuation ids)] -> [(sum of log p(continuation tokens | context), greedy?)], where
    greedy says every continuation token is the model's argmax. impl "rows": one row per distinct
    context + continuation (the reference); "shared": contexts with several multi-token continuations
    run once through the KV cache; "auto" = shared where it applies (rows for one-token continuations,
    lone requests and anything longer than the model's context), rows elsewhere."""
    if impl not in LL_IMPLS:
        raise ValueError(f"loglikelihood impl {impl!r}: use one of {LL_IMPLS}")
    for ctx, cont in requests:
        if not cont:
            raise ValueError("loglikelihood of an empty continuation")
        if not ctx:
            raise ValueError("loglikelihood with an empty context: start it with bos")
    out = [None] * len(requests)
    groups = {}
    if impl != "rows":
        for k, (ctx, cont) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append((k, list(cont)))
        max_len = model.args.max_seq_len
        groups = {ctx: reqs for ctx, reqs in groups.items()
                  if len(ctx) + max(len(c) for _, c in reqs) <= max_len
                  and (impl == "shared" or (len(reqs) > 1 and any(len(c) > 1 for _, c in reqs)))}
        for k, v in _loglikelihood_shared(model, list(groups.items()), batch_size).items():
            out[k] = v
    rest = [k for k in range(len(requests)) if out[k] is None]
    for k, v in zip(rest, _loglikelihood_rows(model, [requests[k] for k in rest], batch_size)):
        out[k] = v
    return out


def loglikelihood(model, tok, pairs, batch_size=16):
    """[(context text, continuation text)] -> [(log-likelihood, greedy)]."""
    return loglikelihood_tokens(model, [encode_pair(tok, c, x) for c, x in pairs], batch_size)


def stderr(p, n):
    """Standard error of an accuracy p measured on n items: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def score_mc(items, lls):
    """Items and the flat list of their choices' log-likelihoods (item by item, choice by choice) ->
    {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}; ties go to the first choice."""
    n, hit, hit_norm, k = len(items), 0, 0, 0
    if n == 0:
        raise UserError("no items to score")
    for it in items:
        ll = lls[k:k + len(it.choices)]
        k += len(it.choices)
        norm = [v / max(1, len(c)) for v, c in zip(ll, it.choices)]   # per character of the choice
        hit += max(range(len(ll)), key=lambda i: (ll[i], -i)) == it.gold
        hit_norm += max(range(len(norm)), key=lambda i: (norm[i], -i)) == it.gold
    assert k == len(lls), f"{len(lls)} log-likelihoods for {k} choices"
    acc, acc_norm = hit / n, hit_norm / n
    return {"acc": acc, "acc_stderr": stderr(acc, n), "acc_norm": acc_norm,
            "acc_norm_stderr": stderr(acc_norm, n), "n": n}


def evaluate_mc(model, tok, items, batch_size=16):
    """Score multiple-choice items with the model: score_mc over every choice's log-likelihood."""
    pairs = [(it.context, c) for it in items for c in it.continuations]
    lls = [ll for ll, _ in loglikelihood(model, tok, pairs, batch_size)]
    return score_mc(items, lls)

# -----------------------------------------------------------------------------
# the tasks: files in ../shared/data, lm-eval-harness prompts

def _read_jsonl(path):
    if not Path(path).is_file():
        raise UserError(f"task file not found: {path} (pass --data-dir DIR holding the shared data)")
    return [obj for _, obj in parse_jsonl(read_utf8(path, "task"), path)]


def arc_items(path):
    """ARC jsonl ({question: {stem, choices: [{text, label}]}, answerKey}) -> MCItems, lm-eval-harness's
    arc_easy/arc_challenge prompt: "Question: {stem}\\nAnswer:", continuations " {text}"."""
    items = []
    for i, d in enumerate(_read_jsonl(path)):
        try:
            q = d["question"]
            labels = [c["label"] for c in q["choices"]]
            items.append(MCItem(f"Question: {q['stem']}\nAnswer:", [c["text"] for c in q["choices"]],
                                labels.index(d["answerKey"])))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} item {i + 1}: not an ARC record ({type(e).__name__}: {e})")
    return items


def hellaswag_preprocess(text):
    """lm-eval-harness's HellaSwag cleanup (WikiHow bracket artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_items(path):
    """HellaSwag jsonl -> MCItems as lm-eval-harness: context = preprocess(activity_label + ": " + ctx_a +
    " " + ctx_b.capitalize()), continuations " " + preprocess(ending)."""
    items = []
    for i, d in enumerate(_read_jsonl(path)):
        try:
            ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
            items.append(MCItem(hellaswag_preprocess(d["activity_label"] + ": " + ctx),
                                [hellaswag_preprocess(e) for e in d["endings"]], int(d["label"])))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} item {i + 1}: not a HellaSwag record ({type(e).__name__}: {e})")
    return items


MMLU_LETTERS = "ABCD"


def mmlu_rows(path):
    """One MMLU csv (no header: question, A, B, C, D, answer letter) -> list of rows."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise UserError(f"MMLU file not found: {path}")
    for i, r in enumerate(rows):
        if len(r) != 6 or r[5] not in MMLU_LETTERS:
            raise UserError(f"{path} row {i + 1}: expected question,A,B,C,D,answer (A-D), got {len(r)} fields")
    return rows


def mmlu_format(row, include_answer):
    """Hendrycks et al.'s format_example: the question, lettered choices, 'Answer:' (+ ' X\\n\\n')."""
    s = row[0] + "".join(f"\n{l}. {c}" for l, c in zip(MMLU_LETTERS, row[1:5])) + "\nAnswer:"
    return s + f" {row[5]}\n\n" if include_answer else s


def mmlu_prompt(subject, row, shots=()):
    """The standard MMLU prompt: header naming the subject, k answered dev questions, the question."""
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "".join(mmlu_format(r, True) for r in shots) + mmlu_format(row, False)


def mmlu_subjects(mmlu_dir, split="test"):
    d = Path(mmlu_dir) / split
    if not d.is_dir():
        raise UserError(f"{d} is not a directory (expected MMLU's {{dev,val,test}}/*.csv under {mmlu_dir})")
    subjects = sorted(p.name[:-len(f"_{split}.csv")] for p in d.glob(f"*_{split}.csv"))
    if not subjects:
        raise UserError(f"no *_{split}.csv files in {d}")
    return subjects


def mmlu_items(mmlu_dir, shots=0, split="test", subjects=None):
    """MCItems (with .subject set) for every question of `split`; the k shots are the first k dev rows of
    the same subject, as in the original evaluation. Continuations: " A", " B", " C", " D"."""
    items = []
    for subject in subjects or mmlu_subjects(mmlu_dir, split):
        dev = mmlu_rows(Path(mmlu_dir) / "dev" / f"{subject}_dev.csv")[:shots] if shots else []
        if len(dev) < shots:
            raise UserError(f"{subject}: {shots} shots asked, its dev split has {len(dev)} questions")
        for row in mmlu_rows(Path(mmlu_dir) / split / f"{subject}_{split}.csv"):
            it = MCItem(mmlu_prompt(subject, row, dev), list(MMLU_LETTERS), MMLU_LETTERS.index(row[5]))
            it.subject = subject
            items.append(it)
    return items


def subset(items, limit, seed=None):
    """--limit: the first `limit` items (seed None), or a seeded random sample of `limit` items kept in
    file order (seed an int; used for MMLU, whose files are sorted by subject, so the sample spans them)."""
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if seed is None:
        return items[:limit]
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]

# -----------------------------------------------------------------------------
# the synthetic tasks: exact match of greedy answers and the held-out loss

@torch.no_grad()
def exact_match(model, tok, examples, max_new_tokens=12, batch_size=64):
    """(fraction of examples whose greedy answer equals the reference, [answers]), after batched greedy
    decoding of each example's prompt; answers compare by data.normalize_answer."""
    was_training = model.training
    model.eval()
    answers = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        for out in generate_batch(model, [ex.prompt for ex in chunk], max_new_tokens, eos_id=tok.eos_id):
            if tok.eos_id in out:
                out = out[:out.index(tok.eos_id)]
            answers.append(tok.decode(out))
    model.train(was_training)
    hits = sum(data.normalize_answer(a) == data.normalize_answer(ex.answer) for a, ex in zip(answers, examples))
    return hits / len(examples), answers


def response_loss(model, examples, batch_size=16):
    """Mean cross-entropy per response token of data.Examples (prompt -> response + eos), the quantity
    train.py reports as held-out loss, computed through loglikelihood_tokens."""
    reqs = [(ex.ids[:ex.n_prompt], ex.ids[ex.n_prompt:]) for ex in examples]
    lls = loglikelihood_tokens(model, reqs, batch_size)
    return -sum(ll for ll, _ in lls) / sum(len(c) for _, c in reqs)


def synthetic_eval(model, tok, seed=0, n_train=4000, n_heldout=64, max_new_tokens=12, limit=None,
                   template="alpaca", batch_size=16):
    """Exact match and held-out loss on data.synthetic_splits' held-out records. The split depends on
    (seed, n_train, n_heldout): use the values the model was trained with (train.py's defaults: 0, 4000, 64)."""
    _, held = data.synthetic_splits(seed, n_train, n_heldout)
    held = subset(held, limit)
    examples, _ = data.build_examples(held, tok, template)
    em, answers = exact_match(model, tok, examples, max_new_tokens)
    n = len(examples)
    return {"exact_match": em, "exact_match_stderr": stderr(em, n), "loss": response_loss(model, examples, batch_size),
            "n": n, "examples": [{"prompt": r["instruction"] + (" " + r["input"] if r["input"] else ""),
                                  "answer": r["output"], "got": data.normalize_answer(a)}
                                 for r, a in zip(held[:5], answers[:5])]}

# -----------------------------------------------------------------------------
# running tasks

MC_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "mmlu")
TASKS = MC_TASKS + ("synthetic",)


def default_data_dir():
    """../shared/data beside the repository (where the project's evaluation data lives)."""
    return str(Path(__file__).resolve().parent.parent / "shared" / "data")


def task_items(task, data_dir, limit=None, mmlu_shots=0, mmlu_split="test", seed=1234):
    """The (possibly subsetted) MCItems of a multiple-choice task. --limit takes the first N items of
    ARC and HellaSwag, and a seeded sample of N questions across all subjects for MMLU."""
    d = Path(data_dir)
    if task in ("arc_easy", "arc_challenge"):
        return subset(arc_items(d / f"{task}_dev.jsonl"), limit)
    if task == "hellaswag":
        return subset(hellaswag_items(d / "hellaswag_1000.jsonl"), limit)
    if task == "mmlu":
        return subset(mmlu_items(d / "mmlu", mmlu_shots, mmlu_split), limit, seed=seed)
    raise UserError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")


def evaluate_tasks(model, tok, tasks, data_dir=None, limit=None, mmlu_shots=0, mmlu_split="test", seed=1234,
                   batch_size=16, synthetic_kw=None, log=None):
    """{task: metrics} for a list of task names. MMLU also reports per-subject accuracy."""
    data_dir = data_dir or default_data_dir()
    results = {}
    for task in tasks:
        t0 = time.time()
        if task == "synthetic":
            r = synthetic_eval(model, tok, limit=limit, batch_size=batch_size, **(synthetic_kw or {}))
        else:
            items = task_items(task, data_dir, limit, mmlu_shots, mmlu_split, seed)
            pairs = [(it.context, c) for it in items for c in it.continuations]
            lls = [ll for ll, _ in loglikelihood(model, tok, pairs, batch_size)]
            r = score_mc(items, lls)
            if task == "mmlu":
                r = {k: v for k, v in r.items() if not k.startswith("acc_norm")}  # same-length choices
                r["shots"], r["split"] = mmlu_shots, mmlu_split
                per, k = {}, 0
                for it in items:
                    ll = lls[k:k + 4]
                    k += 4
                    hits = per.setdefault(it.subject, [0, 0])
                    hits[0] += max(range(4), key=lambda i: (ll[i], -i)) == it.gold
                    hits[1] += 1
                r["subjects"] = {s: {"acc": h / n, "n": n} for s, (h, n) in per.items()}
        r["seconds"] = round(time.time() - t0, 1)
        results[task] = r
        if log:
            log(f"{task}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in r.items() if k not in ("subjects", "examples")))
    return results


def dequantize_for_eval(model):
    """Replace every QuantLinear (outside adapters) by an nn.Linear holding its dequantized weight w~:
    the same function (x @ w~^T in float32, up to float rounding order), with w~ computed once instead of
    at every forward. Evaluation only: the model is no longer a quantized checkpoint."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear) and not name.endswith(".base"):  # adapters keep their QuantLinear
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            model.set_submodule(name, lin.requires_grad_(False))
    return model


def main(argv=None):
    p = ArgumentParser(description="Evaluate a model: perplexity (--ppl), multiple choice and exact match "
                                "(--tasks); one JSON line per task.")
    p.add_argument("--model", default=None, help="HF dir, checkpoint dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--keep-quantized", action="store_true", help="GGUF: keep Q4_1 linears quantized")
    p.add_argument("--ppl", default=None, metavar="FILE", help="text file to compute perplexity on")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per perplexity window")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--adapter", default=None, help="adapter directory (train.py's adapter/), evaluated unmerged")
    p.add_argument("--tasks", default=None, help=f"comma-separated, from {','.join(TASKS)}")
    p.add_argument("--limit", type=int, default=None, help="items per task: the first N (MMLU: a seeded sample of N)")
    p.add_argument("--mmlu-shots", type=int, default=0, choices=[0, 5])
    p.add_argument("--mmlu-split", default="test", choices=["test", "val"])
    p.add_argument("--seed", type=int, default=1234, help="seed of the MMLU --limit sample")
    p.add_argument("--data-dir", default=None, help="ARC/HellaSwag/MMLU files (default ../shared/data)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="data.synthetic_splits seed the model was trained with")
    p.add_argument("--synthetic-n-train", type=int, default=4000, help="... its n_train (train.py's --n-train)")
    p.add_argument("--synthetic-n-heldout", type=int, default=64, help="... its n_heldout (train.py's --n-heldout)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="greedy tokens for exact match")
    p.add_argument("--mc-batch-size", type=int, default=16, help="sequences per forward for --tasks")
    p.add_argument("--exact-kernels", action="store_true",
                   help="--tasks: run quantized layers through their kernels instead of dequantizing them once")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, metavar="FILE", help="also write all results as one JSON object")
    args = p.parse_args(argv)

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    for t in tasks:
        if t not in TASKS:
            raise UserError(f"--tasks: unknown task {t!r}; choose from {', '.join(TASKS)}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit} must be at least 1")
    if args.ppl is None and not tasks:
        raise UserError("nothing to evaluate: pass a task, e.g. --ppl FILE or --tasks arc_easy,mmlu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seq_len < 2:
        raise UserError(f"--seq-len {args.seq_len} is too short; a window needs at least 2 tokens")
    if args.max_windows is not None and args.max_windows < 1:
        raise UserError(f"--max-windows {args.max_windows} must be at least 1")
    path = args.model or embedded_model_path()
    model = Transformer.from_pretrained(path, keep_quantized=args.keep_quantized or bool(args.adapter))
    tok = load_tokenizer(path)
    if args.adapter:
        load_adapters(model, args.adapter)
        model.eval()
    results = {}

    if args.ppl is not None:
        windows = data.perplexity_windows(tok, args.ppl, seq_len=args.seq_len, max_windows=args.max_windows)
        t0 = time.time()
        ppl = perplexity(model, windows, args.seq_len, batch_size=args.batch_size)
        results["ppl"] = {"task": "ppl", "file": args.ppl, "ppl": round(ppl, 4),
                          "n_tokens": windows.shape[0] * (args.seq_len - 1), "windows": windows.shape[0],
                          "seq_len": args.seq_len, "seconds": round(time.time() - t0, 1)}
        print(json.dumps(results["ppl"]))

    if tasks:
        if not args.exact_kernels:
            dequantize_for_eval(model)
        syn = dict(seed=args.synthetic_seed, n_train=args.synthetic_n_train, n_heldout=args.synthetic_n_heldout,
                   max_new_tokens=args.max_new_tokens)
        for task in tasks:
            r = evaluate_tasks(model, tok, [task], args.data_dir, args.limit, args.mmlu_shots, args.mmlu_split,
                               args.seed, args.mc_batch_size, syn)[task]
            results[task] = {"task": task, **r}
            print(json.dumps({k: v for k, v in results[task].items() if k not in ("subjects", "examples")}),
                  flush=True)
    if args.out:
        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(json.dumps({"model": path, "adapter": args.adapter, "limit": args.limit,
                                             "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)
