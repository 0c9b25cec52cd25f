"""bench.py's target arithmetic on hand-made rows (the timings themselves are never asserted)."""
from bench import targets


def row(shape, M, bits, group, impl, ms):
    return dict(shape=shape, M=M, bits=bits, group=group, impl=impl, ms=ms)


def test_targets_read_every_kind_of_row():
    rows = [row("576x576", 1, None, None, "dense fp32", 0.3), row("576x576", 1, 4, 32, "native", 0.05),
            row("576x576", 1, 4, 32, "auto (compiled)", 0.06), row("576x576", 1, 4, 32, "auto bf16 (native)", 0.05),
            row("576x576", 16, 2, 32, "reference", 0.9), row("576x576", 16, 2, 32, "compiled", 0.3),
            # bench_step's rows: the dense LoRA row has no bits or group
            row("576x576", 512, None, None, "dense fp32 LoRA fwd+bwd", 8.0),
            row("576x576", 512, 4, 32, "QA-LoRA 4b g32 fwd+bwd", 10.0)]
    decode = {"float32": 20.0, "4-bit fp32 act": 50.0, "4-bit bf16 act": 70.0, "block_ratio": 4.123,
              "ours bf16 act / llama.cpp": 70.0 / 80.0, "train peft / ours fp32": 1.0 / 0.8,
              "scale": {"name": "llama-8b", "peak_rss_gb": 9.876}}
    out = targets(rows, decode)
    assert out["576x576 4b g32 M=1 auto_fp32/native (<=1.25)"] == 1.2
    assert out["576x576 4b g32 M=1 auto_bf16 x dense fp32 (>=2.5)"] == 6.0
    assert out["576x576 2b g32 M=16 compiled x reference (>=3)"] == 3.0
    assert out["576x576 M=512 QA-LoRA/dense LoRA fwd+bwd (<=1.5)"] == 1.25
    assert out["decode 4-bit bf16 act x float32 (>=1.5)"] == 3.5
    assert out["decode bf16 act / llama.cpp (>=1.0)"] == 0.88
    assert "decode fp32 act / llama.cpp (>=0.8)" not in out      # not measured: no row, no guess
    assert out["block 7b 4-bit x fp32 (>=4)"] == 4.12
    assert out["train step x transformers+PEFT (>=1.3)"] == 1.25
    assert out["scale llama-8b peak RSS GB (<=12 for llama-8b)"] == 9.88
