"""
A small-scale replication of QA-LoRA's Tables 1 and 2 (Xu et al., arXiv 2309.14717) on the embedded
SmolLM2-135M-Instruct, with one command:

    python replicate.py --quick          # fewer steps and items: 17.4 min measured on 2 CPU cores
    python replicate.py                  # the full grid: 63.6 min measured on 2 cores (--resume continues it)

Rows (group size 32 throughout):
  (a) reference: the float model obtained by dequantizing the shipped Q4_1 weights;
  (b) that model quantized to 4/3/2 bits without fine-tuning, by min-max RTN and by GPTQ;
  (c) "QLoRA w/ GPTQ": plain LoRA trained on the GPTQ base, merged in float, requantized with GPTQ;
  (d) QA-LoRA trained on the same GPTQ base and merged exactly into its biases.
(c) and (d) train with train.py itself (one subprocess each, `--quant native` on the saved GPTQ base) on
the same data (the synthetic tasks' training split + Alpaca-1k minus a held-out set, as one JSONL file of
which train.py keeps 8 records aside for its own loss log), steps, learning rate and seed; replicate.py
then merges (c) in float and requantizes it with GPTQ on the same calibration windows as the base.
At 4 bits the shipped weights are already on a 4-bit group-32 grid, so RTN is lossless and the 4-bit
rows isolate what the merge costs (c) or does not cost (d).

Columns: exact match on the synthetic held-out split and the held-out loss (mean cross-entropy per
response token) on it and on held-out Alpaca records, then ARC-Easy, HellaSwag and MMLU (0-shot by
default) on seeded/first-N subsets (eval.py's --limit rules), each accuracy with its standard error.
Table 2 analog: trainable parameters, seconds per step (median over the run's steps) and the peak
resident memory of the training process, LoRA vs QA-LoRA.

Writes OUT/replicate.md (the tables) and OUT/replicate.json (everything behind them), OUT being
results/quick or results/full unless --out; OUT/rows/*.json hold finished rows (reused by --resume)
and OUT/work/ the checkpoints and training runs (large; not for git). Evaluation
scores each quantized model through its dequantized weights (eval.dequantize_for_eval: the same
function, computed once). Deterministic given --seed on a given machine and thread count.
"""
import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

import data
import eval as E
import kernels
import merge
import qalora
import quant
from cli import ArgumentParser, UserError, atomic_path, embedded_model_path, run_cli
from model import Transformer
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# settings: the full grid, and --quick

# the full grid is sized to finish in about 75 minutes on 2 CPU cores (13 evaluated rows, 6 training runs);
# raise --steps and the --limit-* flags for tighter error bars when more time is available
FULL = dict(steps=40, batch_size=8, seq_len=256, n_train=2000, n_heldout=64, alpaca_heldout=50,
            calib_windows=128, calib_len=256, limit_arc=200, limit_hellaswag=200, limit_mmlu=200)
# each method's peak lr per bit width, chosen on a validation split by sweep.py (docs/pooling.md)
CHOSEN_LR = {"qalora": {4: 6e-4, 3: 6e-4, 2: 1.8e-3, 8: 6e-4}, "lora": {4: 1e-3, 3: 1e-3, 2: 3e-3, 8: 1e-3}}
QUICK = dict(steps=16, batch_size=4, seq_len=128, n_train=400, n_heldout=24, alpaca_heldout=12,
             calib_windows=8, calib_len=256, limit_arc=24, limit_hellaswag=16, limit_mmlu=24)


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--quick", action="store_true", help="fewer steps and items (the defaults in brackets below change)")
    a("--model", default=None, help="GGUF or HF dir (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    a("--bits", default="4,3,2", help="comma-separated bit widths")
    a("--group-size", type=int, default=32)
    a("--steps", type=int, default=None, help=f"optimizer steps per run [{FULL['steps']}; quick {QUICK['steps']}]")
    a("--batch-size", type=int, default=None, help=f"examples per step [{FULL['batch_size']}]")
    a("--seq-len", type=int, default=None, help=f"training truncation [{FULL['seq_len']}; quick {QUICK['seq_len']}]")
    a("--lr", type=float, default=None,
      help="peak lr of both methods (default: each method's lr at each bit width, chosen on validation by sweep.py)")
    a("--pool-scale", default=qalora.DEFAULT_POOL_SCALE, choices=qalora.POOL_SCALES, help="QA-LoRA's pool scale")
    a("--rank", type=int, default=16)
    a("--alpha", type=float, default=16.0)
    a("--dropout", type=float, default=0.05)
    a("--n-train", type=int, default=None, help=f"synthetic training records [{FULL['n_train']}; quick {QUICK['n_train']}]")
    a("--n-heldout", type=int, default=None, help=f"synthetic held-out records [{FULL['n_heldout']}; quick {QUICK['n_heldout']}]")
    a("--alpaca", default=None, help="Alpaca JSON (default ../shared/data/alpaca_data_1k.json)")
    a("--alpaca-heldout", type=int, default=None, help=f"Alpaca records held out [{FULL['alpaca_heldout']}]")
    a("--calib", default=None, help="GPTQ calibration text (default ../shared/data/wikitext-2/valid.txt)")
    a("--calib-windows", type=int, default=None, help=f"GPTQ calibration windows [{FULL['calib_windows']}; quick {QUICK['calib_windows']}]")
    a("--calib-len", type=int, default=None, help=f"tokens per calibration window [{FULL['calib_len']}]")
    a("--data-dir", default=None, help="evaluation data (default ../shared/data)")
    a("--limit-arc", type=int, default=None, help=f"ARC-Easy items, the first N [{FULL['limit_arc']}; quick {QUICK['limit_arc']}]")
    a("--limit-hellaswag", type=int, default=None, help=f"HellaSwag items, the first N [{FULL['limit_hellaswag']}; quick {QUICK['limit_hellaswag']}]")
    a("--limit-mmlu", type=int, default=None, help=f"MMLU questions, a seeded sample [{FULL['limit_mmlu']}; quick {QUICK['limit_mmlu']}]")
    a("--mmlu-shots", type=int, default=0, choices=[0, 5])
    a("--seed", type=int, default=0)
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the quantized kernels (kernels.py; default: on, off for --quick where a few steps "
           "would not pay the compile time back); sets QALORA_COMPILE for this process and train.py")
    a("--threads", type=int, default=None, help="torch threads here and in the training runs (default: all cores)")
    a("--out", default=None, help="output folder (default results/quick or results/full)")
    a("--resume", action="store_true", help="reuse the finished rows in --out (same settings only)")
    a("--overwrite", action="store_true", help="replace the results in --out")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    shared = ROOT.parent / "shared" / "data"
    args.alpaca = args.alpaca or str(shared / "alpaca_data_1k.json")
    args.calib = args.calib or str(shared / "wikitext-2" / "valid.txt")
    args.data_dir = args.data_dir or str(shared)
    args.out = args.out or str(ROOT / "results" / ("quick" if args.quick else "full"))
    if args.compile is None:
        args.compile = not args.quick
    try:
        args.bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        raise UserError(f"--bits {args.bits!r}: give comma-separated integers such as 4,3,2")
    for b in args.bits:
        if b not in CHOSEN_LR["qalora"]:
            raise UserError(f"--bits: {b} has no lr chosen by sweep.py; choose from {sorted(CHOSEN_LR['qalora'])}")
    for k in ("steps", "batch_size", "seq_len", "n_train", "n_heldout", "alpaca_heldout", "calib_windows",
              "calib_len", "limit_arc", "limit_hellaswag", "limit_mmlu", "rank"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    return args


# settings that define the results (a --resume must match them); the rest only change how it runs
RESULT_KEYS = ("quick", "model", "bits", "group_size", "steps", "batch_size", "seq_len", "lr", "pool_scale", "rank", "alpha",
               "dropout", "n_train", "n_heldout", "alpaca", "alpaca_heldout", "calib", "calib_windows", "calib_len",
               "data_dir", "limit_arc", "limit_hellaswag", "limit_mmlu", "mmlu_shots", "seed")


def git_commit():
    """The checkout's commit (+ "-dirty" if tracked files changed), or what QALORA_COMMIT says (a copy)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        pass
    return os.environ.get("QALORA_COMMIT")


def say(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)

# -----------------------------------------------------------------------------
# the data shared by every row: one training mix, two held-out sets


def build_data(args, tok, work):
    """Writes work/train_mix.jsonl (synthetic train + Alpaca train); returns (its path, the Alpaca held-out
    Examples)."""
    syn_train, syn_held = data.synthetic_splits(args.seed, args.n_train, args.n_heldout)
    alp_train, alp_held = data.split_records(data.load_records(args.alpaca), args.alpaca_heldout, args.seed)
    mix = work / "train_mix.jsonl"
    with atomic_path(mix) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in syn_train + alp_train))
    alp_held_ex, _ = data.build_examples(alp_held, tok, "alpaca", 512)  # cut only the few longest
    say(f"data: {len(syn_train)} synthetic + {len(alp_train)} Alpaca training records -> {mix}; held out "
        f"{len(syn_held)} synthetic, {len(alp_held_ex)} Alpaca")
    return mix, alp_held_ex

# -----------------------------------------------------------------------------
# evaluating one model: every column of the table


@torch.no_grad()
def weight_error(model, ref):
    """max and mean |w~ - w| over the quantized linears, against the float reference model."""
    ref_mods = dict(ref.named_modules())
    mx, total, n = 0.0, 0.0, 0
    for name, m in model.named_modules():
        if isinstance(m, quant.QuantLinear):
            d = (m.dequantize_weight() - ref_mods[name].weight.float()).abs()
            mx, total, n = max(mx, d.max().item()), total + d.sum().item(), n + d.numel()
    return {"max_abs_dw": mx, "mean_abs_dw": total / n}


@torch.no_grad()
def error_reach(qmodel, fmodel, calib, rank):
    """How much of the quantization error E = W~ - W an update of each kind could remove at best, summed over
    the quantized linears, plain (||.||_F^2) and weighted by the layer inputs of the float model on `calib`
    (H = X^T X, so e H e^T is the output error the base adds). A QA-LoRA update is constant within each
    (row, group): it can remove only E's projection onto group constants ("group-constant"), and at rank r only
    the top r singular directions of that ("QA-LoRA rank r"); a LoRA update is any rank-r matrix ("LoRA rank r").
    Returns {kind: {"plain": share, "weighted": share}}, shares of the error energy in [0, 1]."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, y, n=n: inputs.__setitem__(n, inputs.get(n, 0) +
             (lambda x: x.T @ x)(a[0].reshape(-1, a[0].shape[-1]).double())))
             for n, m in fmodel.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    try:
        for b in range(0, calib.shape[0], 4):
            fmodel(calib[b:b + 4])
    finally:
        for h in hooks:
            h.remove()
    ref = dict(fmodel.named_modules())
    total = {w: 0.0 for w in ("plain", "weighted")}
    removed = {k: dict(total) for k in ("group-constant", f"QA-LoRA rank {rank}", f"LoRA rank {rank}")}
    for name, m in qmodel.named_modules():
        if not isinstance(m, quant.QuantLinear):
            continue
        E = m.dequantize_weight(torch.float64) - ref[name].weight.double()           # [out, in]
        widths = kernels.group_widths(m.in_features, m.group_size, dtype=torch.float64)
        P = torch.repeat_interleave(torch.eye(len(widths), dtype=torch.float64), widths.long(), dim=0)  # [in, ng]
        evals, evecs = torch.linalg.eigh(inputs[name])
        for weight, R in (("plain", torch.eye(m.in_features, dtype=torch.float64)),
                          ("weighted", evecs * evals.clamp_min(0).sqrt() @ evecs.T)):  # R = H^(1/2)
            ER, Q = E @ R, R @ P                                                      # [out, in], [in, ng]
            total[weight] += ER.pow(2).sum().item()
            qe, qv = torch.linalg.eigh(Q.T @ Q)                                     # (Q^T Q)^(-1/2)
            A = ER @ Q @ (qv / qe.clamp_min(1e-30).sqrt() @ qv.T)                   # E R projected on span(Q)
            s_group = torch.linalg.svdvals(A).pow(2)
            removed["group-constant"][weight] += s_group.sum().item()
            removed[f"QA-LoRA rank {rank}"][weight] += s_group[:rank].sum().item()
            removed[f"LoRA rank {rank}"][weight] += torch.linalg.svdvals(ER).pow(2)[:rank].sum().item()
    return {k: {w: v[w] / total[w] if total[w] else float("nan") for w in v} for k, v in removed.items()}


def evaluate(model, tok, args, alp_held_ex):
    """{column: metrics} for a model without adapters (it is dequantized for speed, in place)."""
    E.dequantize_for_eval(model)
    model.eval()
    r = {}
    syn = dict(seed=args.seed, n_train=args.n_train, n_heldout=args.n_heldout)
    r.update(E.evaluate_tasks(model, tok, ["synthetic"], args.data_dir, synthetic_kw=syn, log=say))
    r["alpaca_loss"] = E.response_loss(model, alp_held_ex)
    say(f"alpaca held-out loss {r['alpaca_loss']:.4f}")
    for task, limit in (("arc_easy", args.limit_arc), ("hellaswag", args.limit_hellaswag),
                        ("mmlu", args.limit_mmlu)):
        r.update(E.evaluate_tasks(model, tok, [task], args.data_dir, limit=limit, mmlu_shots=args.mmlu_shots,
                                  seed=1234 + args.seed, log=say))
    return r

# -----------------------------------------------------------------------------
# training: train.py in a subprocess on the saved quantized base


def lr_for(args, method, bits):
    """--lr, else the sweep's choice on validation for this method and bit width (docs/pooling.md)."""
    return args.lr if args.lr is not None else CHOSEN_LR[method][bits]


def train_run(args, base_dir, mix, method, bits, run_dir, log_path):
    """Run train.py; returns the wall seconds. Its peak memory is in its metrics.jsonl (VmHWM)."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(base_dir), "--quant", "native",
           "--bits", str(bits), "--group-size", str(args.group_size), "--data", str(mix), "--template", "alpaca",
           "--method", method, "--rank", str(args.rank), "--alpha", str(args.alpha), "--dropout", str(args.dropout),
           "--pool-scale", args.pool_scale,
           "--lr", repr(lr_for(args, method, bits)), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--max-steps", str(args.steps), "--n-heldout", "8", "--eval-every", "0", "--save-every", "0",
           "--seed", str(args.seed), "--out", str(run_dir), "--overwrite", "--no-gguf", "--time-budget", "0",
           "--threads", str(args.threads)]
    say(f"train: {' '.join(cmd[1:])}")
    t0 = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        tail = Path(log_path).read_text().strip().splitlines()[-3:]
        raise UserError(f"train.py ({method}, {bits} bits) failed with exit code {rc}: "
                        f"{' | '.join(tail)} (log: {log_path})")
    return time.time() - t0


def run_stats(run_dir, args_steps):
    """Trainable parameters (the saved adapter), seconds per step (median over the run's steps) and the
    training process's peak resident memory (VmHWM, which train.py writes to metrics.jsonl)."""
    with safe_open(str(Path(run_dir) / "adapter" / "adapter.safetensors"), "pt") as f:
        n_params = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    recs = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r["tokens"] / r["tokens_per_s"] for r in recs if "loss" in r and r.get("tokens_per_s")]
    assert len(steps) == args_steps, f"{run_dir} ran {len(steps)} steps, not {args_steps}: (c) and (d) must match"
    final = next((r for r in recs if r.get("final")), {})
    return {"trainable_params": n_params, "s_per_step": statistics.median(steps), "steps": len(steps),
            "train_seconds": final.get("train_seconds"), "peak_rss_mb": final.get("peak_rss_mb"),
            "final_train_loss": statistics.mean(r["loss"] for r in recs if "loss" in r and r.get("step", 0) > len(steps) - 10)}

# -----------------------------------------------------------------------------
# the table


def fmt_acc(m, key="acc"):
    return f"{100 * m[key]:.1f} ± {100 * m[key + '_stderr']:.1f}"


def markdown(args, rows, table2, meta):
    shots = f"{args.mmlu_shots}-shot"
    lines = [f"# QA-LoRA replication on {meta['model_name']} ({'--quick' if args.quick else 'full grid'})", "",
             f"Command: `{meta['command']}` (commit {meta['commit']})  ",
             f"Hardware: {meta['hardware']}; torch {torch.__version__}; {args.threads} threads; "
             f"kernels {'compiled' if args.compile else 'eager (QALORA_COMPILE=0)'}; "
             f"wall time {meta['wall_seconds'] / 60:.1f} min.", "",
             f"Group size {args.group_size}; training: {args.steps} steps × {args.batch_size} examples, "
             f"lr {'%g for both' % args.lr if args.lr is not None else 'per method and bit width (the Table 2 rows)'}, "
             f"QA-LoRA pool scale {args.pool_scale}, "
             f"rank {args.rank}, alpha {args.alpha}, dropout {args.dropout}, seed {args.seed}, seq-len {args.seq_len}, "
             f"on {meta['n_train_records']} records (synthetic train + Alpaca-1k train). GPTQ: "
             f"{args.calib_windows} × {args.calib_len} tokens of {Path(args.calib).name}.", "",
             f"Accuracies in % ± standard error (sqrt(p(1-p)/n)). n: synthetic {args.n_heldout}, Alpaca held-out "
             f"{meta['n_alpaca_heldout']}, ARC-Easy first {args.limit_arc}, HellaSwag first {args.limit_hellaswag}, "
             f"MMLU {shots} seeded sample of {args.limit_mmlu} test questions (chance = 25%).", "",
             f"| model | bits | synthetic EM | synth loss | Alpaca loss | ARC-Easy acc | ARC-Easy acc_norm "
             f"| HellaSwag acc_norm | MMLU {shots} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['name']} | {r['bits'] or 'fp32'} | {fmt_acc(m['synthetic'], 'exact_match')} | "
                     f"{m['synthetic']['loss']:.3f} | {m['alpaca_loss']:.3f} | {fmt_acc(m['arc_easy'])} | "
                     f"{fmt_acc(m['arc_easy'], 'acc_norm')} | {fmt_acc(m['hellaswag'], 'acc_norm')} | "
                     f"{fmt_acc(m['mmlu'])} |")
    lines += ["", "Weight error of the untrained quantized bases against the fp32 reference (max / mean |w~ - w|): "
              + "; ".join(f"{r['name']} {r['max_abs_dw']:.2e} / {r['mean_abs_dw']:.2e}" for r in rows
                          if "max_abs_dw" in r) + ".",
              "", "What an update can remove of each GPTQ base's quantization error E = W~ - W at best (share of "
              "||E||² plain, and of the output error weighted by the float model's inputs on 16 calibration "
              "windows): a QA-LoRA update is constant per (row, group), a LoRA update any rank-r matrix.", "",
              "| base | group-constant (any rank) | QA-LoRA rank r | LoRA rank r |", "|---|---|---|---|"]
    for r in rows:
        if "error_reach" in r:
            v = list(r["error_reach"].values())
            if all(x["plain"] != x["plain"] for x in v):  # NaN: 0/0, the base has no error to remove
                lines.append(f"| {r['name']} | no error to remove (the base is lossless) | | |")
                continue
            lines.append(f"| {r['name']} | " + " | ".join(f"{x['plain']:.1%} plain, {x['weighted']:.1%} weighted"
                                                         for x in v) + " |")
    lines += ["", "Notes: MMLU at 135M parameters is near chance (25%) for every row, so its differences are "
              f"noise: at n = {args.limit_mmlu} the standard error near 25% is "
              f"{100 * E.stderr(0.25, args.limit_mmlu):.1f} points, so differences under about twice that are "
              "not significant. Exact match and held-out loss on the synthetic tasks are the primary signals here."]
    lines += ["", "Table 2 analog (training runs above; peak RSS is the train.py process's VmHWM):", "",
              "| method | bits | lr | trainable params | s/step (median) | train wall (s) | peak RSS (MB) | "
              "unmerged synth loss | merged synth loss |", "|---|---|---|---|---|---|---|---|---|"]
    for t in table2:
        lines.append(f"| {t['method']} | {t['bits']} | {t.get('lr', args.lr)} | {t['trainable_params']:,} | {t['s_per_step']:.2f} | "
                     f"{t['train_seconds']} | {t['peak_rss_mb']:.0f} | {t['unmerged_synth_loss']:.4f} | "
                     f"{t['merged_synth_loss']:.4f} |")
    return "\n".join(lines) + "\n"

# -----------------------------------------------------------------------------
# the grid


def main(argv=None):
    args = get_args(argv)
    t_start = time.time()
    args.threads = args.threads or os.cpu_count() or 1
    kernels.COMPILE = args.compile  # this process, and (through the environment) the train.py runs
    os.environ["QALORA_COMPILE"] = "1" if args.compile else "0"
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work, rows_dir = out / "work", out / "rows"
    settings = {k: getattr(args, k) for k in RESULT_KEYS}
    cfg_path = out / "settings.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if args.resume and old != settings:
            k = next(k for k in settings if old.get(k) != settings[k])
            raise UserError(f"--resume: {out} was run with {k}={old.get(k)!r}, now {settings[k]!r}; "
                            f"use the same settings or another --out")
        if not args.resume and not args.overwrite:
            raise UserError(f"{out} holds results: pass --resume to continue them, --overwrite to replace them, "
                            f"or choose another --out")
    if args.overwrite and rows_dir.is_dir():
        shutil.rmtree(rows_dir)
    for d in (work, rows_dir):
        d.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(settings, indent=2) + "\n")

    path = args.model or embedded_model_path()
    tok = load_tokenizer(path)
    mix, alp_held_ex = build_data(args, tok, work)
    _, syn_held = data.synthetic_splits(args.seed, args.n_train, args.n_heldout)
    syn_held_ex, _ = data.build_examples(syn_held, tok, "alpaca")
    calib = data.calibration_windows(tok, args.calib, n=args.calib_windows, seq_len=args.calib_len, seed=args.seed)

    float_model = None

    def get_float():
        nonlocal float_model
        if float_model is None:
            float_model = Transformer.from_pretrained(path, keep_quantized=False)  # Q4_1 dequantized
        return float_model

    def row(name, bits, key, make):
        """Evaluate a model made by make() unless rows/<key>.json already holds it (--resume)."""
        f = rows_dir / f"{key}.json"
        if f.exists():
            say(f"{name}: reusing {f}")
            return json.loads(f.read_text())
        say(f"== {name}")
        t0 = time.time()
        model, extra = make()
        r = {"name": name, "bits": bits, "key": key, **extra, "metrics": evaluate(model, tok, args, alp_held_ex)}
        r["seconds"] = round(time.time() - t0, 1)
        f.write_text(json.dumps(r, indent=2) + "\n")
        return r

    rows, table2 = [], []
    ref_name = "fp32 (dequantized Q4_1)" if str(path).endswith(".gguf") else "fp32"
    rows.append(row(ref_name, None, "fp32", lambda: (copy.deepcopy(get_float()), {})))
    for bits in args.bits:
        def rtn():
            m = quant.quantize_model(copy.deepcopy(get_float()), bits, args.group_size, "rtn", progress=False)
            return m, weight_error(m, get_float())
        rows.append(row(f"{bits}-bit RTN", bits, f"rtn{bits}", rtn))

        base_dir = work / f"gptq{bits}"
        if not (base_dir / "config.json").exists():
            say(f"GPTQ {bits}-bit base -> {base_dir}")
            t0 = time.time()
            m = quant.quantize_model(copy.deepcopy(get_float()), bits, args.group_size, "gptq", calib=calib,
                                     progress=False)
            m.save_pretrained(base_dir, tokenizer=tok)
            (work / f"gptq{bits}.seconds").write_text(f"{time.time() - t0:.1f}\n")
            del m
        def gptq_row(base_dir=base_dir):
            m = Transformer.from_pretrained(base_dir)
            reach = error_reach(m, get_float(), calib[:16], args.rank)
            say(f"GPTQ {bits}-bit: share of the quantization error an update can remove: " + "; ".join(
                f"{k} {v['plain']:.1%} plain, {v['weighted']:.1%} weighted" for k, v in reach.items()))
            return m, dict(weight_error(m, get_float()), error_reach=reach)
        rows.append(row(f"{bits}-bit GPTQ", bits, f"gptq{bits}", gptq_row))

        for method, label in (("lora", "QLoRA w/ GPTQ"), ("qalora", "QA-LoRA")):
            run_dir = work / f"{method}{bits}"

            def trained(method=method, run_dir=run_dir):
                wall = train_run(args, base_dir, mix, method, bits, run_dir, work / f"{method}{bits}.log")
                stats = dict(run_stats(run_dir, args.steps), wall_seconds=round(wall, 1), lr=lr_for(args, method, bits))
                model = Transformer.from_pretrained(base_dir)              # the base it trained on
                qalora.load_adapters(model, run_dir / "adapter")
                stats["unmerged_synth_loss"] = E.response_loss(model.eval(), syn_held_ex)
                if method == "qalora":
                    merge.merge_adapters(model)                            # exact: new biases, same codes
                else:
                    merge.merge_lora_baseline(model, bits, args.group_size, "gptq", calib)  # float merge, GPTQ again
                stats["merged_synth_loss"] = E.response_loss(model, syn_held_ex)
                say(f"{method} {bits}-bit: held-out synthetic loss unmerged {stats['unmerged_synth_loss']:.4f}, "
                    f"merged {stats['merged_synth_loss']:.4f}")
                return model, {"train": stats}
            r = row(f"{bits}-bit {label}", bits, f"{method}{bits}", trained)
            rows.append(r)
            table2.append({"method": "LoRA" if method == "lora" else "QA-LoRA", "bits": bits, **r["train"]})

    meta = {"command": "python replicate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "hardware": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, {platform.system()}",
            "wall_seconds": time.time() - t_start, "n_train_records": sum(1 for _ in open(mix)),
            "n_alpaca_heldout": len(alp_held_ex), "model_name": Path(path).name, "commit": git_commit()}
    result = {"settings": settings, "meta": meta, "rows": rows, "table2": table2}
    with atomic_path(out / "replicate.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(args, rows, table2, meta)
    with atomic_path(out / "replicate.md") as tmp:
        tmp.write_text(md)
    print(md)
    say(f"wrote {out}/replicate.md and {out}/replicate.json in {meta['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    run_cli(main)
