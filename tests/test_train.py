"""train.py end to end on tiny models: loss goes down, merged == unmerged, resume is bit-exact,
DDP == one process, Alpaca data trains, bad input fails with one clear line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from model import Transformer, UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_dir(tmp_path, tiny_args, tiny_sp_path, tiny_tokenizer):
    """A random tiny LLaMA (dim 64: every group 32 wide, so GGUF export works) with the test-trained
    sentencepiece tokenizer (conftest)."""
    torch.manual_seed(0)
    model = Transformer(tiny_args(vocab_size=tiny_tokenizer.vocab_size, max_seq_len=512))
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    shutil.copy(tiny_sp_path, d / "tokenizer.model")
    return d


def flags(model_dir, out, *extra):
    return ["--model", str(model_dir), "--out", str(out), "--n-train", "48", "--n-heldout", "4",
            "--max-new-tokens", "3", "--batch-size", "2", "--seq-len", "256", "--rank", "2", "--lr", "1e-2",
            "--eval-every", "2", "--save-every", "2", "--threads", "1", *extra]


def records(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [r["loss"] for r in records(out) if "loss" in r]


def test_short_run_lowers_loss_merged_equals_unmerged(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(flags(tiny_dir, out, "--max-steps", "8")) == 0
    recs = records(out)
    assert recs[0]["step"] == 0 and "eval_loss" in recs[0] and "eval_exact_match" in recs[0]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all({"lr", "tokens_per_s"} <= set(r) for r in steps)
    final = recs[-1]
    assert final["final"] and final["unmerged_eval_loss"] < final["eval_loss_before"] - 0.1
    rel = abs(final["merged_eval_loss"] - final["unmerged_eval_loss"]) / final["unmerged_eval_loss"]
    assert rel < 1e-5, final
    for f in ("run.json", "checkpoint/state.pt", "adapter/adapter.safetensors", "adapter/adapter.json",
              "merged/config.json", "merged.gguf"):
        assert (out / f).exists(), f
    # the saved merged checkpoint reproduces the merged held-out loss
    import data
    from tokenizer import load_tokenizer
    merged = Transformer.from_pretrained(out / "merged")
    assert merged.quantization["bits"] == 4
    tok = load_tokenizer(out / "merged")
    _, held = data.synthetic_splits(0, 48, 4)
    held_ex, _ = data.build_examples(held, tok, "alpaca", 256)
    assert train.eval_loss(merged, held_ex, tok.eos_id) == pytest.approx(final["merged_eval_loss"], rel=1e-6)


def test_resume_is_bit_exact(tiny_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--max-steps", "6", "--dropout", "0.1")
    train.main(flags(tiny_dir, a, *common))
    train.main(flags(tiny_dir, b, *common, "--stop-after", "3"))
    assert len(losses(b)) == 3 and not (b / "adapter").exists()
    assert torch.load(b / "checkpoint" / "state.pt", weights_only=True)["step"] == 3
    train.main(flags(tiny_dir, b, *common, "--resume"))
    assert losses(b) == losses(a)                       # exactly, float for float
    fa, fb = records(a)[-1], records(b)[-1]
    assert fa["merged_eval_loss"] == fb["merged_eval_loss"]


def test_out_folder_is_protected(tiny_dir, tmp_path):
    out = tmp_path / "run"
    train.main(flags(tiny_dir, out, "--max-steps", "2", "--stop-after", "1"))
    with pytest.raises(UserError, match="holds another run"):
        train.main(flags(tiny_dir, out, "--max-steps", "2"))
    with pytest.raises(UserError, match="--lr was"):
        train.main(flags(tiny_dir, out, "--max-steps", "2", "--resume", "--lr", "0.5"))
    assert train.main(flags(tiny_dir, out, "--max-steps", "2", "--overwrite", "--eval-every", "0")) == 0
    assert len(losses(out)) == 2
    with pytest.raises(UserError, match="no checkpoint"):
        train.main(flags(tiny_dir, tmp_path / "empty", "--resume"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"at step \d+: training stopped"):
        train.main(flags(tiny_dir, out, "--max-steps", "20", "--lr", "1e30", "--save-every", "1", "--eval-every", "0"))
    good = losses(out)
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == len(good) >= 1


def test_alpaca_records_train_and_evaluate(tiny_dir, tmp_path, tiny_data):
    """An Alpaca-format JSON file (records with and without an input) trains, and merged == unmerged."""
    out = tmp_path / "run"
    train.main(flags(tiny_dir, out, "--data", str(tiny_data / "alpaca.json"),
                     "--max-steps", "2", "--seq-len", "128", "--n-heldout", "4", "--no-gguf"))
    recs = records(out)
    assert len(losses(out)) == 2 and all(torch.isfinite(torch.tensor(losses(out))))
    final = recs[-1]
    assert "exact_match_before" not in final and "merged_eval_loss" in final
    assert abs(final["merged_eval_loss"] - final["unmerged_eval_loss"]) <= 1e-5 * final["unmerged_eval_loss"]


def test_alpaca_1k_trains_and_evaluates(tiny_dir, tmp_path, shared_dir):
    """The real Alpaca-1k file (../shared/data) through the same run."""
    out = tmp_path / "run"
    train.main(flags(tiny_dir, out, "--data", str(shared_dir / "data" / "alpaca_data_1k.json"),
                     "--max-steps", "2", "--seq-len", "128", "--n-heldout", "8", "--no-gguf"))
    recs = records(out)
    assert len(losses(out)) == 2 and all(torch.isfinite(torch.tensor(losses(out))))
    final = recs[-1]
    assert "exact_match_before" not in final and "merged_eval_loss" in final
    assert abs(final["merged_eval_loss"] - final["unmerged_eval_loss"]) <= 1e-5 * final["unmerged_eval_loss"]


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, **kw)


def test_malformed_jsonl_is_one_line_with_line_number(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b",}\n')
    r = run_cli(*flags(tiny_dir, tmp_path / "run", "--data", str(bad)))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "line 2" in lines[0], r.stderr


def test_ddp_two_processes_equal_one(tiny_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # lr 1e-4: Adam turns a noise-level gradient component (~eps, where summation order decides its last
    # digits) into a step of up to ~lr, so weights can only agree to ~lr; the gradient norms (which would
    # show a DDP scaling bug that Adam hides) and the losses are compared directly
    common = ("--max-steps", "3", "--dropout", "0", "--eval-every", "0", "--no-gguf", "--grad-accum", "2",
              "--lr", "1e-4")
    train.main(flags(tiny_dir, one, *common, "--batch-size", "2"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29500 + os.getpid() % 1000), str(ROOT / "train.py"),
                        *flags(tiny_dir, two, *common, "--batch-size", "1")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(two) == pytest.approx(losses(one), rel=1e-6, abs=1e-6)
    gnorm = lambda out: [r["grad_norm"] for r in records(out) if "loss" in r]  # noqa: E731
    assert gnorm(two) == pytest.approx(gnorm(one), rel=1e-6)
    from safetensors.torch import load_file
    wa, wb = load_file(one / "adapter" / "adapter.safetensors"), load_file(two / "adapter" / "adapter.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-6)


def test_sigint_checkpoints_and_exits_cleanly(tiny_dir, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                          *flags(tiny_dir, out, "--max-steps", "100000", "--eval-every", "0", "--save-every", "0")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(losses(out)) >= 2:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    assert "interrupted after step" in stdout
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == len(losses(out)) >= 2


def test_time_budget_ends_training_early_but_still_merges(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(flags(tiny_dir, out, "--max-steps", "50", "--time-budget", "0.0001"))
    assert "time budget: training ends after step 1 of 50" in capsys.readouterr().out
    final = records(out)[-1]
    assert final["final"] and final["step"] == 1 and (out / "merged" / "config.json").exists()
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 1


@pytest.mark.parametrize("kind", ["linear", "quant", "bf16", "trainable"])
def test_head_cross_entropy_equals_torch(kind):
    """The loss's frozen-head path (softmax and its gradient in the logits' buffer) against F.cross_entropy on the
    same head: value and the gradient w.r.t. h; a trainable head takes F.cross_entropy itself (its weight's
    gradient too)."""
    import quant
    torch.manual_seed(0)
    dim, vocab, n = 48, 700, 37
    w = torch.randn(vocab, dim)
    if kind == "quant":
        head = quant.QuantLinear.from_codes(*quant.quantize(w, 4, 16), 4, 16)
    else:
        head = torch.nn.Linear(dim, vocab, bias=False, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
        head.requires_grad_(kind == "trainable")
    h = (3 * torch.randn(n, dim)).to(torch.bfloat16 if kind == "bf16" else torch.float32).requires_grad_(True)
    y = torch.randint(0, vocab, (n,))
    got = train.head_cross_entropy(head, h, y)
    (g_got,) = torch.autograd.grad(0.5 * got, h)
    want = torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")
    (g_want,) = torch.autograd.grad(0.5 * want, h)
    tol = 1e-2 if kind == "bf16" else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(g_got.float(), g_want.float(), rtol=tol, atol=tol)
    with torch.no_grad():  # evaluation: the plain path
        torch.testing.assert_close(train.head_cross_entropy(head, h, y), want, rtol=tol, atol=tol)
