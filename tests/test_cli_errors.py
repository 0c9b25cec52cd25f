"""The bad-input table: every CLI, run in a subprocess, exits non-zero with one clear `error:` line on stderr
naming the problem, and no traceback. Plus the write faults: a writer killed with SIGKILL mid-write, or
failing (disk full), leaves the previous files intact."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from cli import UserError, atomic_path
from model import Transformer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_sp_path, tiny_tokenizer):
    """A random tiny LLaMA (every group 32 wide) with the test-trained tokenizer (conftest), float and
    4-bit/g32 versions."""
    from model import ModelArgs
    import quant
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tiny_tokenizer.vocab_size,
                     hidden_dim=96, max_seq_len=64)
    model = Transformer(args)
    model.save_pretrained(d / "float")
    quant.quantize_model(model, 4, 32)
    model.save_pretrained(d / "q4")
    for sub in ("float", "q4"):
        shutil.copy(tiny_sp_path, d / sub / "tokenizer.model")
    return d


def run(*args, cwd=ROOT):
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr.strip()


def assert_clean_error(result, *words):
    rc, err = result
    assert rc != 0, err
    assert "Traceback" not in err, err
    errors = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, err
    for w in words:
        assert w in errors[0], err


def write(path, text):
    path.write_text(text)
    return str(path)


def test_missing_paths(tiny, tmp_path):
    nope = str(tmp_path / "nope")
    assert_clean_error(run("quantize.py", "--model", nope, "--bits", "4", "--out", str(tmp_path / "o")), "nope")
    assert_clean_error(run("eval.py", "--model", nope, "--ppl", nope), "nope")
    assert_clean_error(run("export.py", "--model", nope, "--adapter", nope, "--out", str(tmp_path / "o")), "nope")
    assert_clean_error(run("train.py", "--model", nope, "--out", str(tmp_path / "o")), "nope")
    # a run that failed on its inputs leaves nothing behind that would block the next one
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    assert_clean_error(run("train.py", "--model", str(tiny / "float"), "--data", nope, "--out", str(tmp_path / "o")),
                       "nope")


def test_a_directory_where_a_file_is_expected(tiny, tmp_path):
    assert_clean_error(run("train.py", "--model", str(tiny / "float"), "--data", str(tmp_path),
                           "--out", str(tmp_path / "o")))


def test_header_not_json(tiny, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny / "float", d)
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    (d / "model.safetensors").write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    assert_clean_error(run("generate.py", "--model", str(d), "--prompt", "hi"), "not valid JSON")


def test_contradictory_config(tiny, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny / "float", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_attention_heads"] = 5  # 64 is not divisible by 5
    cfg.pop("head_dim", None)
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run("generate.py", "--model", str(d), "--prompt", "hi"), "divisible")
    cfg["num_attention_heads"], cfg["num_hidden_layers"] = 4, 3  # declares 3 layers, holds 1
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run("generate.py", "--model", str(d), "--prompt", "hi"), "layers")


@pytest.mark.parametrize("gs", ["0", "-2", "abc", "1.5"])
def test_bad_group_size(tiny, tmp_path, gs):
    assert_clean_error(run("quantize.py", "--model", str(tiny / "float"), "--bits", "4", "--group-size", gs,
                           "--out", str(tmp_path / "o")), "group")
    assert_clean_error(run("train.py", "--model", str(tiny / "float"), "--group-size", gs,
                           "--out", str(tmp_path / "o")), "group")


@pytest.mark.parametrize("bits", ["7", "1", "16"])
def test_bad_bits(tiny, tmp_path, bits):
    assert_clean_error(run("quantize.py", "--model", str(tiny / "float"), "--bits", bits, "--out", str(tmp_path / "o")),
                       "bits")
    assert_clean_error(run("train.py", "--model", str(tiny / "float"), "--bits", bits, "--out", str(tmp_path / "o")),
                       "bits")


def test_gguf_export_of_groups_q4_1_cannot_hold(tiny, tmp_path):
    import qalora
    model = Transformer.from_pretrained(tiny / "float")
    import quant
    quant.quantize_model(model, 4, 16)  # blocks of 16: Q4_1 needs 32
    model.save_pretrained(tmp_path / "q16")
    qalora.add_adapters(model, 2, 16)
    qalora.save_adapters(model, tmp_path / "ad")
    assert_clean_error(run("export.py", "--model", str(tmp_path / "q16"), "--adapter", str(tmp_path / "ad"),
                           "--out", str(tmp_path / "o"), "--gguf", str(tmp_path / "o.gguf")), "32")
    assert not (tmp_path / "o.gguf").exists()


def test_adapter_for_another_base_or_rank(tiny, tmp_path):
    import qalora
    import quant
    other = Transformer.from_pretrained(tiny / "float")
    torch.manual_seed(1)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    quant.quantize_model(other, 4, 32)
    qalora.add_adapters(other, 2, 16)
    qalora.save_adapters(other, tmp_path / "ad")
    assert_clean_error(run("generate.py", "--model", str(tiny / "q4"), "--adapter", str(tmp_path / "ad"),
                           "--prompt", "hi"), "base")
    assert_clean_error(run("export.py", "--model", str(tiny / "q4"), "--adapter", str(tmp_path / "ad"),
                           "--out", str(tmp_path / "o")), "base")


def test_bad_datasets(tiny, tmp_path):
    base = ["train.py", "--model", str(tiny / "float"), "--out", str(tmp_path / "o"), "--max-steps", "1"]
    assert_clean_error(run(*base, "--data", write(tmp_path / "e.json", "[]")), "empty")
    assert_clean_error(run(*base, "--data", write(tmp_path / "e.jsonl", "")), "empty")
    bad = '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n'
    assert_clean_error(run(*base, "--data", write(tmp_path / "b.jsonl", bad)), "line 2")
    assert_clean_error(run(*base, "--data", write(tmp_path / "b.json", '[{"instruction": "a"}]')), "0")


def test_prompt_longer_than_context(tiny):
    assert_clean_error(run("generate.py", "--model", str(tiny / "float"), "--prompt", "once upon a time " * 40),
                       "context")


def test_out_holding_another_run(tiny, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert_clean_error(run("train.py", "--model", str(tiny / "float"), "--out", str(out)), "--overwrite")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


# --- write faults ----------------------------------------------------------------------------------

SLOW_WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from cli import atomic_path
with atomic_path({target!r}) as tmp:
    tmp.mkdir()
    (tmp / "part1").write_text("new")
    print("writing", flush=True)
    time.sleep(60)
    (tmp / "part2").write_text("new")
"""


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "part1").write_text("old")
        (tmp / "part2").write_text("old")
    p = subprocess.Popen([sys.executable, "-c", SLOW_WRITER.format(root=str(ROOT), target=str(target))],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (target / "part1").read_text() == "old" and (target / "part2").read_text() == "old"


def test_failed_write_reports_and_keeps_previous(tmp_path, tiny, monkeypatch):
    """A save that fails midway (disk full, simulated by a writer that raises ENOSPC) leaves the previous
    checkpoint untouched and surfaces as an OSError, which run_cli prints as one line."""
    import errno
    import model as model_module
    model = Transformer.from_pretrained(tiny / "float")
    model.save_pretrained(tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(model_module, "save_file", full)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp leftovers


def test_run_cli_prints_one_line_for_os_errors(tmp_path):
    code = ("import sys, errno; sys.path.insert(0, %r); from cli import run_cli\n"
            "def main():\n    raise OSError(errno.ENOSPC, 'No space left on device')\nrun_cli(main)\n" % str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == "error: [Errno 28] No space left on device"
