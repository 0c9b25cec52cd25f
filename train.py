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
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import eval as E
import export
import kernels
import merge
import qalora
import quant
from cli import ArgumentParser, UserError, atomic_path, embedded_model_path, run_cli
from model import Transformer
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# flags

# each method's peak learning rate, chosen on a validation split (docs/pooling.md, sweep.py)
DEFAULT_LR = {"qalora": 6e-4, "lora": 1e-3}  # each method's best by sweep.py (docs/pooling.md)

def get_args(argv=None):
    p = ArgumentParser(description="QA-LoRA fine-tuning: quantize, train adapters, merge exactly, save.")
    a = p.add_argument
    a("--model", default=None, help="HF LLaMA dir, .gguf file or project checkpoint (default: embedded SmolLM2-135M)")
    a("--data", default=None, help="Alpaca JSON/JSONL with instruction/input/output (default: built-in synthetic tasks)")
    a("--template", default="alpaca", choices=data.TEMPLATES, help="prompt format; chat = the tokenizer's ChatML")
    a("--quant", default=None, choices=["rtn", "gptq", "native"],
      help="native keeps an already-quantized model's codes (default for a 4-bit GGUF / checkpoint), else rtn")
    a("--bits", type=int, default=None, help="code width (default: a quantized model's own with --quant native, else 4)")
    a("--group-size", type=int, default=None,
      help="quantization group = QA-LoRA pooling group (default: the model's own with --quant native, else 32)")
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
    a("--offsetless", default="skip", choices=["skip", "requantize"],
      help="GGUF layers whose type has no same-width type with a float offset (Q8_0, Q6_K, Q3_K, Q2_K): skip = "
           "train no adapter there, so merged.gguf keeps their bytes; requantize = adapt them too and re-encode "
           "them as Q8_0 at export, reporting each tensor's error")
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
        return head_cross_entropy(self.model.lm_head, h[keep], y[keep])  # N = response tokens only


def head_cross_entropy(head, h, y):
    """sum over rows of cross_entropy(head(h), y), h [N, dim], y [N]. With a frozen head (QA-LoRA and LoRA train only
    adapters) the softmax and its gradient are formed in the logits' own buffer: F.cross_entropy allocates four more
    [N, vocab] tensors (86 MB each for 440 SmolLM2 positions: log-softmax, its temporary, the zero-filled NLL
    gradient, the log-softmax gradient), and every fresh large tensor costs its page faults again (on this VM
    ~2.5 GB/s, slower than computing the softmax)."""
    if any(p.requires_grad for p in head.parameters()) or not torch.is_grad_enabled():
        return F.cross_entropy(head(h).float(), y, reduction="sum")
    return _HeadCrossEntropy.apply(h, y, head)


class _HeadCrossEntropy(torch.autograd.Function):
    """loss = sum_i logsumexp(z_i) - z_i[y_i], z = head(h). Forward leaves e = exp(z - max) in z's buffer and keeps
    its row sums s; backward turns it into d loss / d z = e / s - onehot(y) in place, then back through the head."""

    @staticmethod
    def forward(ctx, h, y, head):
        hd = h.detach().requires_grad_(True)
        with torch.enable_grad():
            z = head(hd)  # [N, vocab]; the graph hd -> z gives d loss / d h from d loss / d z
        e = z.detach().float()  # z's own buffer when the head computes in float32
        target = e.gather(1, y[:, None]).squeeze(1)  # [N]
        mx = e.amax(dim=1)  # [N]
        s = e.sub_(mx[:, None]).exp_().sum(dim=1)  # [N]; e = exp(z - max) from here on
        ctx.graph, ctx.y = (hd, z, e, s), y
        return (mx + s.log() - target).sum()

    @staticmethod
    def backward(ctx, grad_out):
        hd, z, e, s = ctx.graph
        del ctx.graph
        g = e.div_(s[:, None])  # softmax, in place
        g[torch.arange(g.shape[0]), ctx.y] -= 1
        g.mul_(grad_out)
        (grad_h,) = torch.autograd.grad(z, hd, g.to(z.dtype))
        return grad_h, None, None


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
    return any(isinstance(m, quant.QuantLinear) for m in model.modules())


def quant_summary(model):
    """'4-bit group 32', or for a model whose layers differ (a llama.cpp Q4_K_M, say) what each kind is."""
    kinds = {}
    for m in model.modules():
        if isinstance(m, quant.QuantLinear):
            k = f"{m.ggml_type + ' ' if m.ggml_type else ''}{m.bits}-bit group {m.group_size}"
            kinds[k] = kinds.get(k, 0) + 1
    if len(kinds) == 1:
        return next(iter(kinds))
    return ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))


def load_model(args, path):
    """(model, method, bits, group): native keeps the file's codes (each layer its own bits and group); rtn/gptq
    quantize a float model to --bits/--group-size (4 and 32 unless given)."""
    dtype = DTYPES[args.dtype]
    if args.quant in (None, "native"):
        model = Transformer.from_pretrained(path, dtype=dtype, keep_quantized=True)
        if _is_quantized(model):
            q = model.quantization or {}
            mixed = len({(m.bits, m.group_size) for m in model.modules() if isinstance(m, quant.QuantLinear)}) > 1
            given = (args.bits, args.group_size) != (None, None)
            if mixed and given:
                raise UserError(f"{path} mixes layer types ({quant_summary(model)}): with --quant native every layer "
                                f"keeps its own bits and group; drop --bits/--group-size, or requantize the whole "
                                f"model with --quant rtn|gptq")
            if given and (q.get("bits"), q.get("group_size")) != (args.bits or q.get("bits"),
                                                                   args.group_size or q.get("group_size")):
                raise UserError(f"{path} is already quantized to {q.get('bits')} bits, group {q.get('group_size')}: "
                                f"pass --bits {q.get('bits')} --group-size {q.get('group_size')} to keep its codes "
                                f"(--quant native), or --quant rtn|gptq to requantize from the dequantized weights")
            return model, "native", q.get("bits"), q.get("group_size")
        if args.quant == "native":
            raise UserError(f"--quant native: {path} holds float weights; use --quant rtn or gptq")
        method = "rtn"
    else:
        model = Transformer.from_pretrained(path, dtype=dtype, keep_quantized=False)
        if _is_quantized(model):
            raise UserError(f"{path} is a quantized checkpoint; train it with --quant native")
        method = args.quant
    return model, method, args.bits or 4, args.group_size or 32


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
# the run: main() is the pipeline, one function per step

@dataclass
class Run:
    """What every step of a run needs: the flags, the processes, the output folder, the clock."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    out: Path
    t_start: float
    pad_id: int = 0  # the tokenizer's eos, set once it is loaded
    bits: int = None  # the model's (most common) bits and group size, set once it is loaded
    group_size: int = None

    @property
    def master(self):
        return self.rank == 0

    def say(self, *a):
        if self.master:
            print(*a, flush=True)


def start(argv):
    """Parse and check the flags, join the process group, set the threads, check the output folder."""
    args = get_args(argv)
    t_start = time.time()
    for name in ("batch_size", "grad_accum", "max_steps", "seq_len", "rank"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_new_tokens < 1 or args.n_heldout < 1:
        raise UserError("--max-new-tokens and --n-heldout must be >= 1")
    quant.check_bits_group(4 if args.bits is None else args.bits, 32 if args.group_size is None else args.group_size)
    rank, world, _, device = setup_distributed()
    procs_here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // procs_here))  # cores shared by processes
    run = Run(args, rank, world, device, check_out(args), t_start)
    run.say(f"train.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    if args.dtype == "bfloat16" and device.type == "cpu" and not kernels.cpu_has_bf16():
        run.say("note: --dtype bfloat16 on a CPU without bf16 dot products (AVX512-BF16 or AMX): PyTorch emulates "
                "bf16 matmuls, ~10x slower than float32 (the default, which is exact and faster here)")
    return run


@dataclass
class Splits:
    train: list
    val: list
    held: list


def load_data(run, tok):
    """Training, validation (--n-val, split off the training records) and held-out examples."""
    args = run.args
    if args.data is None:
        train_rec, held_rec = data.synthetic_splits(args.seed, args.n_train, args.n_heldout)
    else:
        train_rec, held_rec = data.split_records(data.load_records(args.data), args.n_heldout, args.seed)
    val_rec = []
    if args.n_val:
        train_rec, val_rec = data.split_records(train_rec, args.n_val, args.val_seed)
    train_ex, trunc = data.build_examples(train_rec, tok, args.template, args.seq_len)
    held_ex, _ = data.build_examples(held_rec, tok, args.template, args.seq_len)
    val_ex = data.build_examples(val_rec, tok, args.template, args.seq_len)[0] if val_rec else []
    run.say(f"data: {len(train_ex)} train / {len(val_ex)} validation / {len(held_ex)} held-out examples "
            f"({args.data or 'synthetic'}, {args.template} template); {trunc}")
    return Splits(train_ex, val_ex, held_ex)


def load_and_quantize(run, path, tok, train_ex):
    """The model on its device, quantized as asked; returns (model, the quantization method used)."""
    args = run.args
    t0 = time.time()
    model, qmethod, run.bits, run.group_size = load_model(args, path)
    if qmethod != "native":
        calib = calibration(args, tok, train_ex) if qmethod == "gptq" else None
        quant.quantize_model(model, run.bits, run.group_size, method=qmethod, calib=calib, progress=run.master)
    model.to(run.device)
    a = model.args
    run.say(f"model: {path}: {a.n_layers} layers, dim {a.dim}, vocab {a.vocab_size}; {quant_summary(model)} via "
            f"{qmethod} ({time.time() - t0:.1f}s)")
    return model, qmethod


def evaluate(run, model, tok, splits, exact):
    """{"eval_loss", "val_loss" (with --n-val), "exact_match" (synthetic data)} of the model as it is."""
    r = {"eval_loss": eval_loss(model, splits.held, run.pad_id, rank=run.rank, world=run.world)}
    if splits.val:
        r["val_loss"] = eval_loss(model, splits.val, run.pad_id, rank=run.rank, world=run.world)
    if exact and run.master:
        r["exact_match"] = E.exact_match(model, tok, splits.held, run.args.max_new_tokens)[0]
    return r


def evaluate_before(run, model, tok, splits, exact, state):
    """The quantized base before any adapter (or, on --resume, what the checkpoint recorded)."""
    if state is not None:
        return state["before"]
    t0 = time.time()
    before = {k: v for k, v in evaluate(run, model, tok, splits, exact).items() if k != "val_loss"}
    run.say(f"before: held-out loss {before['eval_loss']:.4f}" +
            (f", exact match {before['exact_match']:.3f}" if "exact_match" in before else "") +
            f" ({time.time() - t0:.1f}s)")
    before["seconds"] = time.time() - t0
    return before


def add_adapters(run, model):
    """Seeded adapters (their init draws from the torch RNG) and the AdamW over their parameters."""
    args = run.args
    seed_all(args.seed + run.rank)
    offsetless = export.offsetless_layers(model)
    exclude = tuple(offsetless) if args.offsetless == "skip" else ()
    if offsetless:
        kinds = ", ".join(f"{k} x{list(offsetless.values()).count(k)}" for k in sorted(set(offsetless.values())))
        run.say(f"{len(offsetless)} layers ({kinds}) have no GGUF type of their width with a float offset: " +
                ("left without adapters, so merged.gguf keeps their bytes (--offsetless requantize adapts them)"
                 if exclude else "adapted; merged.gguf re-encodes them as Q8_0 (--offsetless requantize)"))
    params = qalora.add_adapters(model, args.rank, args.alpha, args.dropout, method=args.method,
                                 pool_scale=args.pool_scale, init=args.init, exclude=exclude)
    run.say(f"adapters: {args.method} rank {args.rank} alpha {args.alpha}" +
            (f" pool scale {args.pool_scale}" if args.method == "qalora" else "") + f", lr {args.lr:g}: "
            f"{sum(p.numel() for p in params):,} trainable parameters in {len(qalora.adapter_layers(model))} layers")
    model.grad_checkpointing = args.grad_checkpointing
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    return params, optimizer


def resume(run, model, optimizer, sampler, state):
    """Load the checkpoint's adapters, optimizer, data position and RNG; returns the step to continue at."""
    if state is None:
        return 0
    qalora.load_adapters(model, run.out / "checkpoint")
    optimizer.load_state_dict(state["optimizer"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"][run.rank])
    run.say(f"resumed from {run.out}/checkpoint at step {state['step']}")
    return state["step"]


def loss_module(run, model):
    """ResponseLoss, wrapped for DDP over several processes and compiled with --compile."""
    loss_mod = ResponseLoss(model)
    if run.world > 1:
        # the frozen base is identical on every rank: never re-broadcast its (large) buffers per forward
        no_buf = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                  inspect.signature(nn.parallel.DistributedDataParallel).parameters else {"broadcast_buffers": False})
        loss_mod = nn.parallel.DistributedDataParallel(
            loss_mod, device_ids=[run.device] if run.device.type == "cuda" else None, **no_buf)
    return loss_mod, (torch.compile(loss_mod) if run.args.compile else loss_mod)


def train_step(run, loss_mod, step_fn, params, optimizer, sampler, train_ex, step, lr):
    """Optimizer step `step` + 1 over the global batch; returns (loss per response token, tokens, grad norm)."""
    args, world = run.args, run.world
    idx = sampler.take(args.batch_size * args.grad_accum * world)
    n_tgt = data.n_targets([train_ex[i] for i in idx])      # the whole global batch, known to all ranks
    micro = data.shard(idx, run.rank, world, args.batch_size)
    total, ntok = 0.0, 0
    for m, mb in enumerate(micro):
        tokens, labels = data.collate([train_ex[i] for i in mb], run.pad_id)
        sync = world == 1 or m == len(micro) - 1
        with loss_mod.no_sync() if not sync else contextlib.nullcontext():
            loss_sum = step_fn(tokens.to(run.device), labels.to(run.device))
            (loss_sum * (world / n_tgt)).backward()  # DDP averages over ranks: * world
        total += loss_sum.detach().double().item()
        ntok += sum(len(train_ex[i].ids) for i in mb)
    loss = all_sum(total, world) / n_tgt
    if not math.isfinite(loss):
        raise UserError(f"loss is {loss} at step {step + 1}: training stopped; the last good "
                        f"checkpoint is in {run.out}/checkpoint (lower --lr or check the data)")
    for g in optimizer.param_groups:
        g["lr"] = lr
    gnorm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
    if not math.isfinite(gnorm):
        raise UserError(f"gradient norm is {gnorm} at step {step + 1}: training stopped; the "
                        f"last good checkpoint is in {run.out}/checkpoint (lower --lr)")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, int(all_sum(ntok, world)), gnorm


@contextlib.contextmanager
def sigint_flag():
    """While inside: the first SIGINT only sets flag["set"] (the loop checkpoints and stops after the step);
    a second one aborts."""
    flag = {"set": False}

    def on_sigint(sig, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True
    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def stop_reason(run, step, sigint, seconds_per_step, t_final):
    """Why training stops after this step ("interrupted", "stopped": --stop-after, "budget": --time-budget), or
    None. Every rank gets the same answer (rank 0 decides the budget for everyone)."""
    args = run.args
    if all_sum(float(sigint["set"]), run.world):
        return "interrupted"
    if args.stop_after is not None and step >= args.stop_after:
        return "stopped"
    if args.time_budget and step < args.max_steps:
        late = time.time() - run.t_start + seconds_per_step + t_final > args.time_budget * 60
        if all_sum(float(late and run.master), run.world):
            return "budget"
    return None


def train(run, model, params, optimizer, sampler, splits, metrics, step, before):
    """The loop: steps with warmup, held-out loss every --eval-every, checkpoints every --save-every; SIGINT
    and --stop-after checkpoint and stop the run, --time-budget checkpoints and ends training early (merged
    and evaluated as usual). Returns (steps done, tokens seen, seconds, whether the run stops here)."""
    args = run.args
    loss_mod, step_fn = loss_module(run, model)
    warmup = max(1, math.ceil(args.warmup * args.max_steps))
    start_step, tokens_seen, t_train = step, 0, time.time()
    # the final evaluation runs the held-out set twice (unmerged, merged), then saves: budget for it,
    # with a margin for a machine whose load changes
    t_final = 2.5 * before.get("seconds", 0.0) + 60.0
    bar = tqdm(total=args.max_steps, initial=step, disable=not run.master, desc="train", dynamic_ncols=True,
               unit="step", file=sys.stderr)
    model.train()
    with sigint_flag() as sigint, bar:
        while step < args.max_steps:
            t0, lr = time.time(), args.lr * min(1.0, (step + 1) / warmup)  # constant after a linear warmup
            loss, ntok, gnorm = train_step(run, loss_mod, step_fn, params, optimizer, sampler, splits.train, step, lr)
            step, dt, tokens_seen = step + 1, time.time() - t0, tokens_seen + ntok
            metrics.log(step=step, loss=loss, lr=lr, tokens_per_s=ntok / dt, tokens=ntok, grad_norm=gnorm,
                        epoch=sampler.epoch)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}", tok_s=f"{ntok / dt:.0f}", refresh=False)
            bar.update(1)
            if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
                el = eval_loss(model, splits.held, run.pad_id, rank=run.rank, world=run.world)
                metrics.log(step=step, eval_loss=el)
                bar.write(f"step {step}: held-out loss {el:.4f}") if run.master else None
            why = stop_reason(run, step, sigint, (time.time() - t_train) / (step - start_step), t_final)
            if (args.save_every and step % args.save_every == 0) or step == args.max_steps or why:
                save_checkpoint(run.out, model, optimizer, dict(step=step, sampler=sampler.state_dict(),
                                                                before=before), run.world)
            if why == "budget":
                run.say(f"time budget: training ends after step {step} of {args.max_steps} to finish within "
                        f"--time-budget {args.time_budget:g} min (checkpoint saved; --resume continues, "
                        f"--time-budget 0 disables the limit)")
                break
            if why:
                bar.close()
                run.say(f"{why} after step {step}: checkpoint saved in {run.out}/checkpoint; continue with --resume")
                return step, tokens_seen, time.time() - t_train, True
    t_train = time.time() - t_train
    if tokens_seen:
        run.say(f"trained {step - start_step} steps: {tokens_seen} tokens in {t_train:.0f}s, "
                f"{tokens_seen / t_train:.0f} tokens/s")
    return step, tokens_seen, t_train, False


def merge_and_evaluate(run, model, tok, splits, exact, qmethod, before):
    """Unmerged, then merged (QA-LoRA: exact; LoRA: float merge and requantization) held-out loss, validation
    loss and exact match; the adapter is saved in between. Returns the final metrics."""
    args = run.args
    model.eval()
    final = {f"unmerged_{k}": v for k, v in evaluate(run, model, tok, splits, exact).items()}
    if run.master:
        with atomic_path(run.out / "adapter") as tmp:
            qalora.save_adapters(model, tmp)
    if args.method == "qalora":
        merge.merge_adapters(model)
    else:  # the baseline: float merge, then quantize again (lossy)
        calib = calibration(args, tok, splits.train) if qmethod == "gptq" else None
        merge.merge_lora_baseline(model, run.bits, run.group_size, "gptq" if qmethod == "gptq" else "rtn", calib)
    final.update({f"merged_{k}": v for k, v in evaluate(run, model, tok, splits, exact).items()})
    final["eval_loss_before"] = before["eval_loss"]
    if "exact_match" in before:
        final["exact_match_before"] = before["exact_match"]
    rel = abs(final["merged_eval_loss"] - final["unmerged_eval_loss"]) / abs(final["unmerged_eval_loss"])
    run.say(f"held-out loss: before {before['eval_loss']:.4f}, unmerged {final['unmerged_eval_loss']:.6f}, "
            f"merged {final['merged_eval_loss']:.6f} (relative difference {rel:.1e})")
    if "merged_exact_match" in final:
        run.say(f"exact match: before {before['exact_match']:.3f}, unmerged {final['unmerged_exact_match']:.3f}, "
                f"merged {final['merged_exact_match']:.3f}")
    return final


def save_outputs(run, model, tok):
    """merged/ (checkpoint + tokenizer) and, unless --no-gguf or impossible, merged.gguf."""
    model.save_pretrained(run.out / "merged", tokenizer=tok)
    run.say(f"saved {run.out}/adapter, {run.out}/merged")
    if run.args.no_gguf:
        return
    requantize = run.args.offsetless == "requantize"
    why = export.gguf_unsupported(model, requantize)
    if why is None:
        report = []
        export.export_gguf(model, run.out / "merged.gguf", requantize=requantize, report=report)
        for line in report:
            run.say(f"  {line}")
        run.say(f"saved {run.out}/merged.gguf")
    else:
        run.say(f"no merged.gguf: {why}")


def main(argv=None):
    run = start(argv)
    args = run.args
    path = args.model or embedded_model_path()
    tok = load_tokenizer(path)
    run.pad_id = tok.eos_id if tok.eos_id is not None else 0
    splits = load_data(run, tok)
    exact = args.data is None and not args.no_exact_match          # exact match: synthetic tasks only
    model, qmethod = load_and_quantize(run, path, tok, splits.train)
    claim_out(args, run.rank)
    if run.world > 1:
        dist.barrier()
    state = load_state(run)
    before = evaluate_before(run, model, tok, splits, exact, state)
    params, optimizer = add_adapters(run, model)
    sampler = data.Sampler(len(splits.train), seed=args.seed)
    step = resume(run, model, optimizer, sampler, state)
    metrics = Metrics(run.out / "metrics.jsonl", run.master, keep_until=step if state is not None else None)
    if state is None:
        metrics.log(step=0, **{k if k.startswith("eval") else f"eval_{k}": v for k, v in before.items()})
    step, tokens, seconds, stopped = train(run, model, params, optimizer, sampler, splits, metrics, step, before)
    if stopped:
        return 0
    final = {"step": step, "final": True, "train_seconds": round(seconds, 1),
             "train_tokens_per_s": tokens / seconds if tokens else None}
    final.update(merge_and_evaluate(run, model, tok, splits, exact, qmethod, before))
    if run.master:
        save_outputs(run, model, tok)
        final["total_seconds"] = round(time.time() - run.t_start, 1)
        final["peak_rss_mb"] = peak_rss_mb()
        metrics.log(**final)
        run.say(f"done in {final['total_seconds']:.0f}s")
    if run.world > 1:
        dist.barrier()
    return 0


def load_state(run):
    """The checkpoint's state.pt on --resume (read by every rank), else None."""
    if not run.args.resume:
        return None
    state = torch.load(run.out / "checkpoint" / "state.pt", weights_only=True)
    if len(state["rng"]) != run.world:
        raise UserError(f"--resume: the checkpoint was written by {len(state['rng'])} processes, this run has "
                        f"{run.world}; resume with the same --nproc_per_node")
    return state


if __name__ == "__main__":
    try:
        run_cli(main)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
