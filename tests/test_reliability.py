"""Untrusted files: seeded random byte mutations of a small safetensors header, a small GGUF file and JSONL
lines each end in a clean UserError or a successful load, never another exception or a hang."""
import random
import time

import numpy as np
import pytest
import torch

from model import Transformer, UserError


def tiny_gguf(path):
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in [("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 64),
                 ("attention.head_count", 4), ("attention.head_count_kv", 2), ("context_length", 64)]:
        w.add_uint32(f"llama.{k}", v)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 32)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    for n, shape in [("attn_q", (32, 32)), ("attn_k", (16, 32)), ("attn_v", (16, 32)), ("attn_output", (32, 32)),
                     ("ffn_gate", (64, 32)), ("ffn_up", (64, 32)), ("ffn_down", (32, 64))]:
        w.add_tensor(f"blk.0.{n}.weight", rng.standard_normal(shape).astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def mutate(data: bytes, rng: random.Random, region: int) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(min(len(b), region))] = rng.randrange(256)
    if rng.random() < 0.2:
        b = b[:rng.randrange(len(b))]
    return bytes(b)


def fuzz(load, path, data, region, n, seed=0):
    rng = random.Random(seed)
    outcomes = {"ok": 0, "error": 0}
    for i in range(n):
        path.write_bytes(mutate(data, rng, region))
        t0 = time.perf_counter()
        try:
            load()
            outcomes["ok"] += 1
        except UserError:
            outcomes["error"] += 1
        assert time.perf_counter() - t0 < 10, f"case {i} took {time.perf_counter() - t0:.1f} s"
    return outcomes


def test_fuzz_gguf(tmp_path):
    src = tmp_path / "src.gguf"
    tiny_gguf(src)
    Transformer.from_pretrained(src)  # the unmutated file loads
    target = tmp_path / "m.gguf"
    out = fuzz(lambda: Transformer.from_pretrained(target), target, src.read_bytes(), 1200, 150)
    assert out["error"] > 0


def test_fuzz_safetensors_header(tmp_path, tiny_args):
    model = Transformer(tiny_args(n_layers=1))
    model.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    header_len = 8 + int.from_bytes(data[:8], "little")
    out = fuzz(lambda: Transformer.from_pretrained(tmp_path / "m"), f, data, header_len, 150, seed=1)
    assert out["error"] > 0


def test_fuzz_jsonl(tmp_path):
    from data import load_records
    good = '{"instruction": "Add 2 and 3.", "input": "", "output": "5"}\n' * 3
    rng = random.Random(2)
    f = tmp_path / "d.jsonl"
    for _ in range(100):
        f.write_bytes(mutate(good.encode(), rng, len(good)))
        try:
            load_records(f)
        except UserError as e:
            assert "line" in str(e) or "empty" in str(e) or "utf" in str(e).lower(), str(e)


def test_lying_safetensors_offsets(tmp_path, tiny_args):
    """A header whose offsets point past the file must be refused before any allocation."""
    import json
    model = Transformer(tiny_args(n_layers=1))
    model.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [1 << 40, 1 << 20]
    header[name]["data_offsets"] = [0, 4 << 60]
    raw = json.dumps(header).encode()
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(UserError, match="invalid header entry"):
        Transformer.from_pretrained(tmp_path / "m")
