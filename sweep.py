"""
The pooling-scale and learning-rate sweep behind train.py's defaults (docs/pooling.md).

QA-LoRA's adapter reads c_g * mean_g(x) per quantization group (qalora.py: pool_scale mean, sum, sqrt,
ngroups). The merge is exact for every c, but AdamW is not scale-invariant in its input, so c decides
which learning rate trains the adapter well. This script chooses c and each method's lr by experiment:

    python sweep.py                  # all stages, resumable: finished runs are reused (~2.5 h on 2 cores)
    python sweep.py --report         # only rebuild the tables and the figure from finished runs
    python sweep.py --quick          # the confirmation: 4 bits, LoRA / mean / sum only (~45 min on 2 cores)

Every run is `train.py --max-steps 40 --n-val 64 ...` on the embedded SmolLM2 and the built-in synthetic
tasks. Choices are made on the validation split (64 examples split off the training examples with
--val-seed 1), never on the held-out split that the tables report. Stages:

  1. 4 bits: every pool scale and LoRA, 5 lrs each, half a decade apart, centred where the input's scale
     puts the optimum (sum/ngroups read inputs ~sqrt(g) larger than sqrt, mean ~sqrt(g) smaller);
     then lr/2 and 2*lr around the best of the two best pool scales and of LoRA;
  2. 3 and 2 bits (RTN bases made once by quantize.py, trained with --quant native): the two best pool
     scales and LoRA, 3 lrs around each one's 4-bit optimum (x1/3, x1, x3);
  3. the official xavier init of A against Kaiming, on the winner only, at lr/2, lr, 2*lr;
  4. seeds 1 and 2 for the winner, the runner-up and LoRA at their chosen lrs (seed noise).

--quick repeats the decision on a smaller grid: 4 bits, LoRA and the mean and sum pool scales at
x1/2, x1, x2 of QUICK_CENTRE (the full sweep's optima, docs/pooling.md), then stage 4's seeds.

Writes OUT/sweep.md, OUT/sweep.json and OUT/curves.png (matplotlib, optional:
`pip install -r requirements-experiments.txt`); OUT/runs/*.json hold each finished run (its final
metrics and per-step losses); WORK holds the runs' folders and bases (large, not for git).
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from cli import ArgumentParser, UserError, atomic_path, run_cli

ROOT = Path(__file__).resolve().parent
POOLS = ("mean", "sum", "sqrt", "ngroups")
# stage-1 centres: LoRA's lr where the adapter's input has x's per-entry RMS (LoRA itself, sqrt), scaled by
# 1/c for the others: the mean reads ~1/sqrt(32) of it, the sum and ngroups (18-48 groups) ~sqrt(32) more
CENTRE = {"lora": 1e-3, "sqrt": 1e-3, "mean": 1e-2, "sum": 3e-4, "ngroups": 3e-4}
QUICK_CENTRE = {"lora": 1e-3, "mean": 2e-2, "sum": 6e-4}
HALF_DECADE = {1e-2: (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), 1e-3: (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
               3e-4: (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)}


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", default=str(ROOT / "results" / "sweep"), help="tables, figure and per-run summaries")
    a("--work", default=str(ROOT / "results" / "sweep-work"), help="run folders and quantized bases (large)")
    a("--steps", type=int, default=40, help="optimizer steps per run")
    a("--n-val", type=int, default=64, help="validation examples split off the training examples")
    a("--jobs", type=int, default=2, help="runs at a time (each with --threads cores / jobs)")
    a("--stages", default="1,2,3,4", help="comma-separated stages to run (later stages need earlier ones)")
    a("--report", action="store_true", help="only write the tables and figure from finished runs")
    a("--quick", action="store_true", help="4 bits, LoRA/mean/sum around QUICK_CENTRE, then seeds (stage 4)")
    args = p.parse_args(argv)
    try:
        args.stages = {int(s) for s in args.stages.split(",")}
    except ValueError:
        raise UserError(f"--stages {args.stages!r}: give comma-separated stage numbers such as 1,2")
    if not args.stages <= {1, 2, 3, 4} or args.jobs < 1 or args.steps < 1:
        raise UserError("--stages takes numbers 1-4; --jobs and --steps must be >= 1")
    return args

# -----------------------------------------------------------------------------
# one run: train.py in a subprocess, summarized into OUT/runs/<key>.json


def run_key(r):
    what = "lora" if r["method"] == "lora" else r["pool"]
    return f"b{r['bits']}-{what}-{r['init']}-lr{r['lr']:.2g}-s{r['seed']}"


def spec(bits, what, lr, init="kaiming", seed=0):
    method = "lora" if what == "lora" else "qalora"
    return {"bits": bits, "method": method, "pool": None if method == "lora" else what, "init": init,
            "lr": float(f"{lr:.3g}"), "seed": seed}


def train_cmd(args, r, run_dir, threads):
    cmd = [sys.executable, str(ROOT / "train.py"), "--bits", str(r["bits"]), "--method", r["method"],
           "--init", r["init"], "--lr", repr(r["lr"]), "--seed", str(r["seed"]), "--max-steps", str(args.steps),
           "--n-val", str(args.n_val), "--eval-every", "0", "--save-every", "0", "--no-gguf", "--no-exact-match",
           "--time-budget", "0", "--threads", str(threads), "--out", str(run_dir), "--overwrite"]
    if r["pool"]:
        cmd += ["--pool-scale", r["pool"]]
    if r["bits"] != 4:
        cmd += ["--model", str(base_dir(args, r["bits"])), "--quant", "native"]
    return cmd


def base_dir(args, bits):
    return Path(args.work) / f"base-rtn{bits}"


def make_base(args, bits):
    """The RTN base of `bits` bits, group 32, from the embedded model's dequantized weights (once)."""
    d = base_dir(args, bits)
    if (d / "config.json").exists():
        return
    say(f"quantizing the {bits}-bit RTN base -> {d}")
    subprocess.run([sys.executable, str(ROOT / "quantize.py"), "--bits", str(bits), "--group-size", "32",
                    "--quant", "rtn", "--out", str(d), "--overwrite"], check=True, cwd=ROOT)


def summarize(run_dir):
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    final = next(r for r in recs if r.get("final"))
    steps = [r for r in recs if "loss" in r]
    return {"final": final, "loss": [r["loss"] for r in steps], "before": recs[0].get("eval_loss"),
            "s_per_step": sorted(r["tokens"] / r["tokens_per_s"] for r in steps)[len(steps) // 2]}


def run_all(args, specs):
    """Run every spec not yet summarized in OUT/runs, args.jobs at a time; returns {key: summary}."""
    runs_dir = Path(args.out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    todo = [r for r in specs if not (runs_dir / f"{run_key(r)}.json").exists()]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    for bits in sorted({r["bits"] for r in todo} - {4}):
        make_base(args, bits)
    running = []
    while todo or running:
        while todo and len(running) < args.jobs:
            r = todo.pop(0)
            run_dir = Path(args.work) / "runs" / run_key(r)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            log = open(run_dir.parent / f"{run_key(r)}.log", "w")
            say(f"start {run_key(r)} ({len(todo)} more queued)")
            proc = subprocess.Popen(train_cmd(args, r, run_dir, threads), stdout=log, stderr=subprocess.STDOUT,
                                    cwd=ROOT)
            running.append((proc, r, run_dir, log, time.time()))
        time.sleep(2)
        for item in list(running):
            proc, r, run_dir, log, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                tail = Path(log.name).read_text().strip().splitlines()[-2:]
                raise UserError(f"train.py failed for {run_key(r)} (exit {proc.returncode}): {' | '.join(tail)} "
                                f"(log: {log.name})")
            s = dict(spec=r, cmd=" ".join(train_cmd(args, r, "OUT", threads)[1:]), wall=round(time.time() - t0, 1),
                     **summarize(run_dir))
            with atomic_path(runs_dir / f"{run_key(r)}.json") as tmp:
                tmp.write_text(json.dumps(s) + "\n")
            for big in ("merged", "checkpoint"):  # 100+ MB each; metrics.jsonl and adapter/ stay
                subprocess.run(["rm", "-rf", str(run_dir / big)])
            f = s["final"]
            say(f"done  {run_key(r)}: val {f['unmerged_val_loss']:.4f}, held-out unmerged "
                f"{f['unmerged_eval_loss']:.4f} / merged {f['merged_eval_loss']:.4f} ({s['wall']:.0f}s)")
    return load_runs(args)


def load_runs(args):
    runs_dir = Path(args.out) / "runs"
    out = {}
    for f in sorted(runs_dir.glob("*.json")) if runs_dir.is_dir() else []:
        s = json.loads(f.read_text())
        out[run_key(s["spec"])] = s
    return out

# -----------------------------------------------------------------------------
# the stages: each plan depends only on finished runs, so a resumed sweep makes the same choices


def val(s):
    v = s["final"]["unmerged_val_loss"]
    return v if math.isfinite(v) else math.inf


def best(runs, bits, what, init="kaiming", seed=0):
    """(lr, summary) of the lowest validation loss for a method/pool at `bits` bits, or None."""
    cand = [(s["spec"]["lr"], s) for s in runs.values()
            if (s["spec"]["pool"] or "lora") == what and s["spec"]["bits"] == bits and s["spec"]["init"] == init
            and s["spec"]["seed"] == seed]
    return min(cand, key=lambda c: val(c[1])) if cand else None


def ranked_pools(runs, bits=4):
    return sorted((w for w in POOLS if best(runs, bits, w)), key=lambda w: val(best(runs, bits, w)[1]))


def plan(args, runs, stage):
    if stage == "quick":
        return [spec(4, w, lr * f) for w, lr in QUICK_CENTRE.items() for f in (0.5, 1.0, 2.0)]
    if stage == 1:
        return [spec(4, w, lr) for w in ("lora",) + POOLS for lr in HALF_DECADE[CENTRE[w]]]
    if stage == 1.5:  # planned on stage 1's grid only, so a resumed sweep makes the same choice
        grid = {k: s for k, s in runs.items() if s["spec"]["bits"] == 4 and s["spec"]["init"] == "kaiming"
                and s["spec"]["seed"] == 0 and s["spec"]["lr"] in HALF_DECADE[CENTRE[s["spec"]["pool"] or "lora"]]}
        return [spec(4, w, best(grid, 4, w)[0] * f) for w in ["lora"] + ranked_pools(grid)[:2] for f in (0.5, 2.0)]
    if stage == 2:
        return [spec(bits, w, best(runs, 4, w)[0] * f) for bits in (3, 2) for w in ["lora"] + ranked_pools(runs)[:2]
                for f in (1 / 3, 1.0, 3.0)]
    winner = ranked_pools(runs)[0]
    lr = best(runs, 4, winner)[0]
    if stage == 3:
        return [spec(4, winner, lr * f, init="xavier") for f in (0.5, 1.0, 2.0)]
    if stage == 4:
        init = chosen_init(runs)
        chosen = [(winner, init, best(runs, 4, winner, init)[0]), (ranked_pools(runs)[1], "kaiming",
                  best(runs, 4, ranked_pools(runs)[1])[0]), ("lora", "kaiming", best(runs, 4, "lora")[0])]
        return [spec(4, w, lr, init=i, seed=s) for w, i, lr in chosen for s in (1, 2)]
    raise AssertionError(stage)


def seed_mean(runs, what, lr, init="kaiming", bits=4):
    """Mean validation loss over seeds 0, 1, 2 at one lr, or None until all three ran."""
    vs = [val(s) for s in runs.values() if (s["spec"]["pool"] or "lora") == what and s["spec"]["lr"] == lr
          and s["spec"]["init"] == init and s["spec"]["bits"] == bits]
    return sum(vs) / len(vs) if len(vs) >= 3 else None


def chosen_pool(runs):
    """The final choice: of the two best pool scales at seed 0, the lower mean over three seeds at its best
    lr once stage 4 has run them (seed noise is as large as their difference), else the seed-0 winner."""
    top = ranked_pools(runs)[:2]
    means = {w: seed_mean(runs, w, best(runs, 4, w)[0]) for w in top}
    if len(top) == 2 and None not in means.values():
        return min(top, key=means.get), "mean of seeds 0-2 at each one's best lr"
    return top[0], "seed 0"


def chosen_init(runs):
    winner = ranked_pools(runs)[0]
    x = best(runs, 4, winner, "xavier")
    return "xavier" if x and val(x[1]) < val(best(runs, 4, winner)[1]) else "kaiming"

# -----------------------------------------------------------------------------
# the report: tables and curves


def say(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def ema(xs, k=0.8):
    out, m = [], None
    for x in xs:
        m = x if m is None else k * m + (1 - k) * x
        out.append(m)
    return out


def lr_table(runs, bits, init="kaiming"):
    whats = [w for w in ("lora",) + POOLS if best(runs, bits, w, init)]
    lrs = sorted({s["spec"]["lr"] for s in runs.values() if s["spec"]["bits"] == bits and s["spec"]["seed"] == 0
                  and s["spec"]["init"] == init})
    cell = {((s["spec"]["pool"] or "lora"), s["spec"]["lr"]): s for s in runs.values()
            if s["spec"]["bits"] == bits and s["spec"]["seed"] == 0 and s["spec"]["init"] == init}
    lines = [f"| {bits} bits, {init} | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for w in whats:
        b = best(runs, bits, w, init)[0]
        row = []
        for lr in lrs:
            s = cell.get((w, lr))
            v = "" if s is None else f"{val(s):.3f}"
            row.append(f"**{v}**" if s is not None and lr == b else v)
        lines.append(f"| {'LoRA' if w == 'lora' else 'QA-LoRA ' + w} | " + " | ".join(row) + " |")
    return lines


def report(args, runs):
    out = Path(args.out)
    lines = ["# Pool scale and learning rate: the sweep", "",
             f"`python sweep.py{' --quick' if args.quick else ''}` ({len(runs)} runs of `train.py --max-steps {args.steps} --n-val {args.n_val}` on the "
             f"embedded SmolLM2-135M-Instruct, synthetic tasks; {platform.machine()}, {os.cpu_count()} cores). "
             "Cells: **validation** loss (unmerged; 64 examples split off the training set, never the held-out "
             "split); bold: each row's best lr.", ""]
    for bits in (4, 3, 2):
        if any(s["spec"]["bits"] == bits for s in runs.values()):
            lines += lr_table(runs, bits) + [""]
    if any(s["spec"]["init"] == "xavier" for s in runs.values()):
        lines += lr_table(runs, 4, "xavier") + [""]
    lines += ["At each row's best lr (seed 0): validation loss, then the held-out loss unmerged / merged (LoRA "
              "merged = float merge, then RTN requantization), median s/step:", "",
              "| bits | method | lr | val | held-out unmerged | held-out merged | s/step |", "|---|---|---|---|---|---|---|"]
    for bits in (4, 3, 2):
        for w in ("lora",) + POOLS:
            b = best(runs, bits, w)
            if b:
                f = b[1]["final"]
                lines.append(f"| {bits} | {'LoRA' if w == 'lora' else 'QA-LoRA ' + w} | {b[0]:g} | {val(b[1]):.4f} | "
                             f"{f['unmerged_eval_loss']:.4f} | {f['merged_eval_loss']:.4f} | {b[1]['s_per_step']:.2f} |")
    seeds = [s for s in runs.values() if s["spec"]["seed"] != 0]
    if seeds:
        lines += ["", "Seeds 0, 1, 2 at the chosen lrs (4 bits): mean ± sd over seeds", "",
                  "| method | init | lr | val | held-out unmerged | held-out merged |", "|---|---|---|---|---|---|"]
        groups = {}
        for s in runs.values():
            sp = s["spec"]
            groups.setdefault(((sp["pool"] or "lora"), sp["init"], sp["lr"], sp["bits"]), []).append(s)
        for (w, init, lr, bits), ss in groups.items():
            if bits != 4 or len(ss) < 2:
                continue
            def ms(key):
                xs = [x["final"][key] for x in ss]
                m = sum(xs) / len(xs)
                return f"{m:.4f} ± {(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5:.4f}"
            lines.append(f"| {'LoRA' if w == 'lora' else 'QA-LoRA ' + w} | {init} | {lr:g} | {ms('unmerged_val_loss')} | "
                         f"{ms('unmerged_eval_loss')} | {ms('merged_eval_loss')} |")
    if ranked_pools(runs):
        w, how = chosen_pool(runs)
        init = chosen_init(runs)
        lines += ["", f"Chosen on validation ({how}): pool scale **{w}**, init **{init}**, QA-LoRA lr "
                  f"**{best(runs, 4, w, init)[0]:g}**, LoRA lr **{best(runs, 4, 'lora')[0]:g}**."]
    figure = plot(runs, out / "curves.png")
    lines += ["", f"![loss curves]({figure.name})" if figure else "(no figure: matplotlib is not installed)"]
    with atomic_path(out / "sweep.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "sweep.json") as tmp:
        tmp.write_text(json.dumps({k: {kk: v for kk, v in s.items()} for k, s in runs.items()}, indent=1) + "\n")
    print("\n".join(lines))
    return lines


def plot(runs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed (pip install -r requirements-experiments.txt): no figure")
        return None
    bits_all = [b for b in (4, 3, 2) if any(s["spec"]["bits"] == b for s in runs.values())]
    fig, axes = plt.subplots(2, len(bits_all), figsize=(5 * len(bits_all), 8), squeeze=False)
    colors = {"lora": "black", "mean": "tab:blue", "sum": "tab:red", "sqrt": "tab:green", "ngroups": "tab:orange"}
    for j, bits in enumerate(bits_all):
        top, bottom = axes[0][j], axes[1][j]
        for w in ("lora",) + POOLS:
            pts = sorted((s["spec"]["lr"], val(s)) for s in runs.values() if (s["spec"]["pool"] or "lora") == w
                         and s["spec"]["bits"] == bits and s["spec"]["seed"] == 0 and s["spec"]["init"] == "kaiming")
            if not pts:
                continue
            label = "LoRA" if w == "lora" else f"QA-LoRA {w}"
            top.plot([p[0] for p in pts], [min(p[1], 6) for p in pts], "o-", color=colors[w], label=label)
            lr, s = best(runs, bits, w)
            bottom.plot(range(1, len(s["loss"]) + 1), ema(s["loss"]), color=colors[w], label=f"{label}, lr {lr:g}")
        top.set_xscale("log")
        top.set_xlabel("peak learning rate")
        top.set_ylabel("validation loss after the run")
        top.set_title(f"{bits} bits: final validation loss vs lr")
        bottom.set_xlabel("step")
        bottom.set_ylabel("training loss (EMA 0.8)")
        bottom.set_title(f"{bits} bits: training loss at each best lr")
        bottom.set_ylim(0, 2.5)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def main(argv=None):
    args = get_args(argv)
    if not args.report:
        for stage in ("quick", 4) if args.quick else (1, 1.5, 2, 3, 4):
            if args.quick or int(stage) in args.stages:
                say(f"== stage {stage}")
                run_all(args, plan(args, load_runs(args), stage))
    runs = load_runs(args)
    if not runs:
        raise UserError(f"no finished runs in {args.out}/runs: run python sweep.py first")
    report(args, runs)


if __name__ == "__main__":
    run_cli(main)
