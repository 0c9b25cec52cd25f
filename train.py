"""
The QA-LoRA trainer: load -> quantize -> add adapters -> train -> merge -> evaluate -> save.

    python train.py --bits 4                      # embedded SmolLM2-135M-Instruct Q4_1, synthetic tasks
    python train.py --model DIR|FILE.gguf --data alpaca.json --bits 4 --group-size 32 --out out/
    python train.py ... --resume                  # continue the run in --out, bit for bit on CPU
    torchrun --nproc_per_node 2 train.py ...      # DDP over the adapter parameters (gloo / nccl)

Only the adapters train (AdamW, constant LR after a 3% linear warmup, grad-norm clip 0.3, alpha 16 as
the paper). The loss is the mean cross-entropy over the response tokens of each optimizer step's global
batch; the head is applied only at those positions, never as full [B, T, vocab] logits.

The --out folder (DESIGN.md): run.json (the flags), metrics.jsonl (one JSON per optimizer step, eval
records with eval_* keys), checkpoint/ (adapter, optimizer, RNG states, data position; temp dir +
rename), adapter/, merged/ (the merged quantized checkpoint + tokenizer), merged.gguf.
"""
import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import qalora
from model import ArgumentParser, Transformer, UserError, atomic_path, embedded_model_path, run_cli

# -----------------------------------------------------------------------------
# flags

# each method's peak learning rate, chosen on a validation split (docs/pooling.md, sweep.py)
DEFAULT_LR = {"qalora": 1e-3, "lora": 1e-3}

def get_args(argv=None):
    p = ArgumentParser(description="QA-LoRA fine-tuning: quantize, train adapters, merge exactly, save.")
    a = p.add_argument
    a("--model", default=None, help="HF LLaMA dir, .gguf file or project checkpoint (default: embedded SmolLM2-135M)")
    a("--data", default=None, help="Alpaca JSON/JSONL with instruction/input/output (default: built-in synthetic tasks)")
    a("--template", default="alpaca", choices=data.TEMPLATES, help="prompt format; chat = the tokenizer's ChatML")
    a("--quant", default=None, choices=["rtn", "gptq", "native"],
      help="native keeps an already-quantized model's codes (default for a 4-bit GGUF / checkpoint), else rtn")
    a("--bits", type=int, default=4)
    a("--group-size", type=int, default=32, help="quantization group = QA-LoRA pooling group")
    a("--calib", default=None, help="text file for GPTQ calibration (default: the training examples)")
    a("--method", default="qalora", choices=["qalora", "lora"], help="lora = the QLoRA-style baseline")
    a("--pool-scale", default=qalora.DEFAULT_POOL_SCALE, choices=qalora.POOL_SCALES,
      help="QA-LoRA's adapter input per group: mean (official code), sum (paper), sqrt = sqrt(width) * mean, "
           "ngroups = n_groups * mean (PEFT); the merge is exact for each")
    a("--init", default="kaiming", choices=qalora.INITS, help="init of the adapter's A (B starts at zero)")
    a("--rank", type=int, default=16)
    a("--alpha", type=float, default=16.0)
    a("--dropout", type=float, default=0.05)
    a("--lr", type=float, default=None,
      help="peak learning rate (default per method: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    a("--warmup", type=float, default=0.03, help="warmup as a fraction of --max-steps")
    a("--weight-decay", type=float, default=0.0)
    a("--max-grad-norm", type=float, default=0.3)
    a("--batch-size", type=int, default=8, help="examples per micro-batch per process")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--seq-len", type=int, default=128, help="longer examples are truncated")
    a("--max-steps", type=int, default=150, help="optimizer steps")
    a("--n-train", type=int, default=4000, help="synthetic training examples")
    a("--n-heldout", type=int, default=64, help="held-out examples (synthetic, or split off --data)")
    a("--n-val", type=int, default=0,
      help="validation examples split off the training examples (for choosing hyperparameters; 0: none)")
    a("--val-seed", type=int, default=1, help="seed of the validation split")
    a("--no-exact-match", action="store_true", help="skip the greedy exact-match evaluation (synthetic data)")
    a("--max-new-tokens", type=int, default=12, help="greedy tokens for exact match")
    a("--eval-every", type=int, default=50, help="held-out loss every N steps (0: never)")
    a("--save-every", type=int, default=50, help="checkpoint every N steps (0: only at the end)")
    a("--stop-after", type=int, default=None, help="checkpoint and stop after this step, as SIGINT would")
    a("--time-budget", type=float, default=14.0,
      help="minutes for the whole run: training ends early (checkpointed, then merged and evaluated as usual) "
           "when the remaining steps would not fit; 0 = no limit")
    a("--grad-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    a("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="base model compute dtype")
    a("--threads", type=int, default=None, help="torch CPU threads (default: cores / processes)")
    a("--compile", action="store_true", help="torch.compile the loss")
    a("--seed", type=int, default=0)
    a("--out", default="out", help="output folder")
    a("--overwrite", action="store_true", help="replace the run already in --out")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--no-gguf", action="store_true", help="skip the merged.gguf export")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.method]
    return args


# flags that may change between a run and its --resume; all others must match
RESUMABLE = {"max_steps", "time_budget", "eval_every", "save_every", "stop_after", "threads", "compile", "out", "overwrite",
             "resume", "no_gguf", "grad_checkpointing"}
RUN_FILES = ("run.json", "metrics.jsonl", "checkpoint", "adapter", "merged", "merged.gguf")

# -----------------------------------------------------------------------------
# distributed: torchrun sets RANK/WORLD_SIZE; one process otherwise

def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, local, device


def all_sum(x, world):
    """Sum of a float across processes (float64 on the wire)."""
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()

# -----------------------------------------------------------------------------
# the loss: cross-entropy on response positions only, head applied only there

class ResponseLoss(nn.Module):
    """(tokens [B, T], labels [B, T]) -> summed cross-entropy over positions whose next label is real.
    A module so DistributedDataParallel can wrap it (DDP hooks need the forward to go through it)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, labels):
        h = self.model.hidden_states(tokens)[:, :-1]           # [B, T-1, dim]: position t predicts t+1
        y = labels[:, 1:]                                       # [B, T-1]
        keep = y != data.IGNORE
        logits = self.model.lm_head(h[keep])                    # [N, vocab], N = response tokens only
        return F.cross_entropy(logits.float(), y[keep], reduction="sum")


@torch.no_grad()
def eval_loss(model, examples, pad_id, batch_size=16, rank=0, world=1):
    """Mean response-token cross-entropy over examples (sharded over processes)."""
    was = model.training
    model.eval()
    loss_fn, total, count = ResponseLoss(model), 0.0, 0
    for i in range(rank * batch_size, len(examples), world * batch_size):
        chunk = examples[i:i + batch_size]
        tokens, labels = data.collate(chunk, pad_id)
        total += loss_fn(tokens, labels).double().item()
        count += data.n_targets(chunk)
    model.train(was)
    return all_sum(total, world) / all_sum(count, world)

# -----------------------------------------------------------------------------
# RNG state: torch (dropout), python, numpy; per process

def rng_state():
    npst = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]), float(npst[4])]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st):
    torch.set_rng_state(st["torch"])
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

# -----------------------------------------------------------------------------
# the output folder

def check_out(args):
    """Refuse a folder holding another run unless --overwrite; --resume needs its checkpoint and the same
    flags. Writes nothing: a run that fails on its inputs must not leave files that block the next one."""
    out = Path(args.out)
    if args.resume:
        if not (out / "checkpoint" / "state.pt").is_file():
            raise UserError(f"--resume: no checkpoint in {out}/checkpoint; start a new run without --resume")
        old = json.loads((out / "run.json").read_text())
        new = vars(args)
        diff = [k for k in old if k not in RESUMABLE and old[k] != new.get(k)]
        if diff:
            k = diff[0]
            raise UserError(f"--resume: --{k.replace('_', '-')} was {old[k]!r} in the run in {out}, now {new.get(k)!r}; "
                            f"resume with the same flags")
        return out
    present = [f for f in RUN_FILES if (out / f).exists()]
    if present and not args.overwrite:
        raise UserError(f"{out} holds another run ({', '.join(present)}): pass --overwrite to replace it, "
                        f"--resume to continue it, or choose another --out")
    return out


def claim_out(args, rank):
    """Once the inputs have loaded: clear the previous run (--overwrite) and record this run's flags."""
    out = Path(args.out)
    if args.resume or rank != 0:  # rank 0 prepares the folder (the caller waits at a barrier)
        return
    import shutil
    for f in RUN_FILES:
        p = out / f
        if p.exists():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(vars(args), indent=2) + "\n")


class Metrics:
    """Appends one JSON object per line to out/metrics.jsonl (rank 0 only)."""

    def __init__(self, path, enabled, keep_until=None):
        self.path, self.enabled = Path(path), enabled
        if enabled and keep_until is not None and self.path.exists():  # resume: drop what came after the checkpoint
            lines = [l for l in self.path.read_text().splitlines() if l.strip()]
            kept = [l for l in lines if json.loads(l).get("step", 0) <= keep_until and not json.loads(l).get("final")]
            self.path.write_text("".join(l + "\n" for l in kept))

    def log(self, **rec):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def save_checkpoint(out, model, optimizer, state, world):
    """checkpoint/: adapter.safetensors + adapter.json, state.pt (optimizer, step, sampler, RNG of every
    process). Written to a temp dir and renamed, so a crash never leaves half a checkpoint."""
    import qalora
    rngs = [rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state())
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    with atomic_path(out / "checkpoint") as tmp:
        tmp.mkdir()
        qalora.save_adapters(model, tmp)
        torch.save(dict(state, optimizer=optimizer.state_dict(), rng=rngs), tmp / "state.pt")

# -----------------------------------------------------------------------------
# loading and quantizing

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_quantized(model):
    from quant import QuantLinear
    return any(isinstance(m, QuantLinear) for m in model.modules())


def load_model(args, path):
    """The model, quantized as asked: native keeps the file's codes; rtn/gptq quantize a float model."""
    import quant
    dtype = DTYPES[args.dtype]
    if args.quant in (None, "native"):
        model = Transformer.from_pretrained(path, dtype=dtype, keep_quantized=True)
        if _is_quantized(model):
            q = model.quantization or {}
            if (q.get("bits"), q.get("group_size")) != (args.bits, args.group_size):
                raise UserError(f"{path} is already quantized to {q.get('bits')} bits, group {q.get('group_size')}: "
                                f"pass --bits {q.get('bits')} --group-size {q.get('group_size')} to keep its codes "
                                f"(--quant native), or --quant rtn|gptq to requantize from the dequantized weights")
            return model, "native"
        if args.quant == "native":
            raise UserError(f"--quant native: {path} holds float weights; use --quant rtn or gptq")
        args_quant = "rtn"
    else:
        model = Transformer.from_pretrained(path, dtype=dtype, keep_quantized=False)
        if _is_quantized(model):
            raise UserError(f"{path} is a quantized checkpoint; train it with --quant native")
        args_quant = args.quant
    return model, args_quant


def calibration(args, tok, train_ex):
    """GPTQ calibration ids [n, T]: random windows of --calib text, or the training examples packed."""
    if args.calib:
        return data.calibration_windows(tok, args.calib, n=64, seq_len=min(256, args.seq_len * 2), seed=args.seed)
    ids = [i for ex in train_ex[:512] for i in ex.ids]
    T = min(256, max(16, len(ids) // 32))
    n = min(64, len(ids) // T)
    return torch.tensor(ids[:n * T], dtype=torch.long).view(n, T)

def peak_rss_mb():
    """This process's peak resident memory (VmHWM, Linux), in MB; None where /proc is absent. Not
    ru_maxrss: a child started by exec inherits its parent's ru_maxrss, but VmHWM starts afresh."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
        return kb / 1024
    except (OSError, StopIteration):
        return None

# -----------------------------------------------------------------------------
# the run

def main(argv=None):
    args = get_args(argv)
    t_start = time.time()
    rank, world, local, device = setup_distributed()
    master = rank == 0
    procs_here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // procs_here))  # cores shared by processes
    say = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    say(f"train.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    for name in ("batch_size", "grad_accum", "max_steps", "seq_len", "rank"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_new_tokens < 1 or args.n_heldout < 1:
        raise UserError("--max-new-tokens and --n-heldout must be >= 1")
    import merge
    import quant
    quant.check_bits_group(args.bits, args.group_size)
    out = check_out(args)
    from tokenizer import load_tokenizer

    # data
    path = args.model or embedded_model_path()
    tok = load_tokenizer(path)
    if args.data is None:
        train_rec, held_rec = data.synthetic_splits(args.seed, args.n_train, args.n_heldout)
    else:
        train_rec, held_rec = data.split_records(data.load_records(args.data), args.n_heldout, args.seed)
    val_rec = []
    if args.n_val:  # a validation split off the training records, for choosing hyperparameters
        train_rec, val_rec = data.split_records(train_rec, args.n_val, args.val_seed)
    train_ex, trunc = data.build_examples(train_rec, tok, args.template, args.seq_len)
    held_ex, _ = data.build_examples(held_rec, tok, args.template, args.seq_len)
    val_ex = data.build_examples(val_rec, tok, args.template, args.seq_len)[0] if val_rec else []
    say(f"data: {len(train_ex)} train / {len(val_ex)} validation / {len(held_ex)} held-out examples "
        f"({args.data or 'synthetic'}, {args.template} template); {trunc}")
    pad_id = tok.eos_id if tok.eos_id is not None else 0
    synthetic = args.data is None and not args.no_exact_match

    # model: load -> quantize
    t0 = time.time()
    model, qmethod = load_model(args, path)
    if qmethod != "native":
        calib = calibration(args, tok, train_ex) if qmethod == "gptq" else None
        quant.quantize_model(model, args.bits, args.group_size, method=qmethod, calib=calib, progress=master)
    model.to(device)
    a = model.args
    say(f"model: {path}: {a.n_layers} layers, dim {a.dim}, vocab {a.vocab_size}; {args.bits}-bit group "
        f"{args.group_size} via {qmethod} ({time.time() - t0:.1f}s)")
    claim_out(args, rank)
    if world > 1:
        dist.barrier()

    # checkpoint to resume from (read by every rank)
    state = None
    if args.resume:
        state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
        if len(state["rng"]) != world:
            raise UserError(f"--resume: the checkpoint was written by {len(state['rng'])} processes, this run has "
                            f"{world}; resume with the same --nproc_per_node")

    # "before": the quantized base, no adapters yet
    if state is None:
        t0 = time.time()
        before = {"eval_loss": eval_loss(model, held_ex, pad_id, rank=rank, world=world)}
        if synthetic and master:
            before["exact_match"] = data.exact_match(model, tok, held_ex, args.max_new_tokens)[0]
        say(f"before: held-out loss {before['eval_loss']:.4f}" +
            (f", exact match {before['exact_match']:.3f}" if "exact_match" in before else "") +
            f" ({time.time() - t0:.1f}s)")
        before["seconds"] = time.time() - t0
    else:
        before = state["before"]

    # adapters (seeded: their init draws from the torch RNG)
    seed_all(args.seed + rank)
    params = qalora.add_adapters(model, args.rank, args.alpha, args.dropout, method=args.method,
                                 pool_scale=args.pool_scale, init=args.init)
    say(f"adapters: {args.method} rank {args.rank} alpha {args.alpha}" +
        (f" pool scale {args.pool_scale}" if args.method == "qalora" else "") + f", lr {args.lr:g}: {sum(p.numel() for p in params):,} "
        f"trainable parameters in {len(qalora.adapter_layers(model))} layers")
    model.grad_checkpointing = args.grad_checkpointing
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    sampler = data.Sampler(len(train_ex), seed=args.seed)
    step = 0
    if state is not None:
        qalora.load_adapters(model, out / "checkpoint")
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        step = state["step"]
        set_rng_state(state["rng"][rank])
        say(f"resumed from {out}/checkpoint at step {step}")

    metrics = Metrics(out / "metrics.jsonl", master, keep_until=step if state is not None else None)
    if state is None:
        metrics.log(step=0, **{k if k.startswith("eval") else f"eval_{k}": v for k, v in before.items()})

    loss_mod = ResponseLoss(model)
    if world > 1:
        # the frozen base is identical on every rank: never re-broadcast its (large) buffers per forward
        import inspect
        no_buf = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                  inspect.signature(nn.parallel.DistributedDataParallel).parameters else {"broadcast_buffers": False})
        loss_mod = nn.parallel.DistributedDataParallel(loss_mod, device_ids=[device] if device.type == "cuda" else None,
                                                       **no_buf)
    step_fn = torch.compile(loss_mod) if args.compile else loss_mod

    # SIGINT: finish the step, checkpoint, exit cleanly (a second ^C aborts)
    stop = {"flag": False}

    def on_sigint(sig, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
    old_handler = signal.signal(signal.SIGINT, on_sigint) if hasattr(signal, "SIGINT") else None

    warmup = max(1, math.ceil(args.warmup * args.max_steps))
    lr_at = lambda s: args.lr * min(1.0, (s + 1) / warmup)  # noqa: E731  constant after a linear warmup
    per_step = args.batch_size * args.grad_accum * world
    ckpt_state = lambda: dict(step=step, sampler=sampler.state_dict(), before=before)  # noqa: E731

    from tqdm import tqdm
    start_step = step
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, desc="train", dynamic_ncols=True,
               unit="step", file=sys.stderr)
    model.train()
    t_train, tokens_seen, budget_stop = time.time(), 0, False
    # the final evaluation runs the held-out set twice (unmerged, merged), then saves: budget for it,
    # with a margin for a machine whose load changes
    t_final = 2.5 * before.get("seconds", 0.0) + 60.0
    try:
        while step < args.max_steps:
            t0 = time.time()
            idx = sampler.take(per_step)
            n_tgt = data.n_targets([train_ex[i] for i in idx])      # the whole global batch, known to all ranks
            micro = data.shard(idx, rank, world, args.batch_size)
            total, ntok = 0.0, 0
            for m, mb in enumerate(micro):
                tokens, labels = data.collate([train_ex[i] for i in mb], pad_id)
                sync = world == 1 or m == len(micro) - 1
                with loss_mod.no_sync() if not sync else contextlib.nullcontext():
                    loss_sum = step_fn(tokens.to(device), labels.to(device))
                    (loss_sum * (world / n_tgt)).backward()  # DDP averages over ranks: * world
                total += loss_sum.detach().double().item()
                ntok += sum(len(train_ex[i].ids) for i in mb)
            loss = all_sum(total, world) / n_tgt
            ntok = int(all_sum(ntok, world))
            if not math.isfinite(loss):
                raise UserError(f"loss is {loss} at step {step + 1}: training stopped; the last good checkpoint "
                                f"is in {out}/checkpoint (lower --lr or check the data)")
            lr = lr_at(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            gnorm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
            if not math.isfinite(gnorm):
                raise UserError(f"gradient norm is {gnorm} at step {step + 1}: training stopped; the last good "
                                f"checkpoint is in {out}/checkpoint (lower --lr)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - t0
            tokens_seen += ntok
            metrics.log(step=step, loss=loss, lr=lr, tokens_per_s=ntok / dt, tokens=ntok, grad_norm=gnorm,
                        epoch=sampler.epoch)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}", tok_s=f"{ntok / dt:.0f}", refresh=False)
            bar.update(1)
            if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
                el = eval_loss(model, held_ex, pad_id, rank=rank, world=world)
                metrics.log(step=step, eval_loss=el)
                bar.write(f"step {step}: held-out loss {el:.4f}") if master else None
            interrupted = bool(all_sum(float(stop["flag"]), world))
            stopping = interrupted or (args.stop_after is not None and step >= args.stop_after)
            if args.time_budget and step < args.max_steps and not stopping:  # rank 0 decides for everyone
                sec_per_step = (time.time() - t_train) / (step - start_step)
                late = time.time() - t_start + sec_per_step + t_final > args.time_budget * 60
                budget_stop = bool(all_sum(float(late and master), world))
            if (args.save_every and step % args.save_every == 0) or step == args.max_steps or stopping or budget_stop:
                save_checkpoint(out, model, optimizer, ckpt_state(), world)
            if budget_stop:
                say(f"time budget: training ends after step {step} of {args.max_steps} to finish within "
                    f"--time-budget {args.time_budget:g} min (checkpoint saved; --resume continues, "
                    f"--time-budget 0 disables the limit)")
                break
            if stopping:
                bar.close()
                say(f"{'interrupted' if interrupted else 'stopped'} after step {step}: checkpoint saved in "
                    f"{out}/checkpoint; continue with --resume")
                return 0
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    t_train = time.time() - t_train
    if tokens_seen:
        say(f"trained {step - start_step} steps: {tokens_seen} tokens in {t_train:.0f}s, {tokens_seen / t_train:.0f} tokens/s")

    # final: unmerged vs merged, held-out loss and exact match
    final = {"step": step, "final": True, "train_seconds": round(t_train, 1),
             "train_tokens_per_s": tokens_seen / t_train if tokens_seen else None}
    model.eval()
    final["unmerged_eval_loss"] = eval_loss(model, held_ex, pad_id, rank=rank, world=world)
    if val_ex:
        final["unmerged_val_loss"] = eval_loss(model, val_ex, pad_id, rank=rank, world=world)
    if synthetic and master:
        final["unmerged_exact_match"] = data.exact_match(model, tok, held_ex, args.max_new_tokens)[0]
    if master:
        with atomic_path(out / "adapter") as tmp:
            qalora.save_adapters(model, tmp)
    if args.method == "qalora":
        merge.merge_adapters(model)
    else:  # the baseline: float merge, then quantize again (lossy)
        calib = calibration(args, tok, train_ex) if qmethod == "gptq" else None
        merge.merge_lora_baseline(model, args.bits, args.group_size, "gptq" if qmethod == "gptq" else "rtn", calib)
    final["merged_eval_loss"] = eval_loss(model, held_ex, pad_id, rank=rank, world=world)
    if val_ex:
        final["merged_val_loss"] = eval_loss(model, val_ex, pad_id, rank=rank, world=world)
    if synthetic and master:
        final["merged_exact_match"] = data.exact_match(model, tok, held_ex, args.max_new_tokens)[0]
        final["exact_match_before"] = before["exact_match"]
    final["eval_loss_before"] = before["eval_loss"]
    rel = abs(final["merged_eval_loss"] - final["unmerged_eval_loss"]) / abs(final["unmerged_eval_loss"])
    say(f"held-out loss: before {before['eval_loss']:.4f}, unmerged {final['unmerged_eval_loss']:.6f}, "
        f"merged {final['merged_eval_loss']:.6f} (relative difference {rel:.1e})")
    if synthetic and master:
        say(f"exact match: unmerged {final['unmerged_exact_match']:.3f}, merged {final['merged_exact_match']:.3f}")
        say(f"exact match: {before['exact_match']:.3f} -> {final['merged_exact_match']:.3f}")
    if master:
        model.save_pretrained(out / "merged")
        say(f"saved {out}/adapter, {out}/merged")
        gs_ok = all(g % 32 == 0 for m in model.modules() if isinstance(m, quant.QuantLinear)
                    for g in quant.group_sizes(m.in_features, m.group_size))
        if args.no_gguf:
            pass
        elif args.bits == 4 and gs_ok:
            merge.export_gguf(model, out / "merged.gguf")
            say(f"saved {out}/merged.gguf")
        else:
            widths = sorted({g for m in model.modules() if isinstance(m, quant.QuantLinear)
                             for g in quant.group_sizes(m.in_features, m.group_size)})
            say(f"no merged.gguf: GGUF Q4_1 needs 4 bits and every group a multiple of 32 wide "
                f"(have {args.bits} bits, group widths {widths})")
        final["total_seconds"] = round(time.time() - t_start, 1)
        final["peak_rss_mb"] = peak_rss_mb()
        metrics.log(**final)
        say(f"done in {final['total_seconds']:.0f}s")
    if world > 1:
        dist.barrier()
    return 0


if __name__ == "__main__":
    try:
        run_cli(main)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
