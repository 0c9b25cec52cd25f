"""The foundation: golden logits and greedy text of stories260K, HF save/load round trips, the KV cache,
the embedded SmolLM2 GGUF against an independent numpy decoder, and clear errors on bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT
from generate import generate, generate_batch
from model import ModelArgs, Transformer, UserError, one_query_attention, permute_qk
from tokenizer import load_tokenizer


def random_model(args, seed=0):
    torch.manual_seed(seed)
    m = Transformer(args)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


# --- stories260K: golden files from HF transformers ------------------------------------------------

def test_stories_logits_match_reference(stories_dir):
    model = Transformer.from_pretrained(stories_dir)
    ref = load_file(str(stories_dir / "reference_logits.safetensors"))
    with torch.no_grad():
        logits = model(ref["tokens"])
    assert logits.shape == ref["logits"].shape
    err = (logits - ref["logits"]).abs().max().item()
    assert err < 1e-4, f"max |logits - reference| = {err}"


@pytest.mark.parametrize("use_cache", [True, False])
def test_stories_greedy_matches_golden_text(stories_dir, use_cache):
    model = Transformer.from_pretrained(stories_dir)
    tok = load_tokenizer(stories_dir)
    golden = json.loads((stories_dir / "greedy.json").read_text())
    ids = tok.encode("Once upon a time")
    assert ids == golden["prompt_ids"]
    new = generate(model, ids, 64, use_cache=use_cache)
    assert new == golden["new_ids"]
    assert "Once upon a time" + tok.decode(new) == (stories_dir / "greedy.txt").read_text()


def test_generate_cli_reproduces_greedy_text(stories_dir):
    r = subprocess.run([sys.executable, "generate.py", "--model", str(stories_dir), "--prompt", "Once upon a time",
                        "--max-new-tokens", "64", "--temperature", "0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == (stories_dir / "greedy.txt").read_text()
    assert "tokens/s" in r.stderr and "GB/s" in r.stderr


def test_generate_cli_prints_prompt_plus_greedy_continuation(tiny_model_dir):
    """generate.py on a model directory (conftest's tiny LLaMA and its tokenizer): stdout is the prompt plus
    the decoded greedy continuation that generate() computes in process, stderr the speed line."""
    model = Transformer.from_pretrained(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    new = generate(model, tok.encode("Once upon a time"), 24, eos_id=tok.eos_id)
    assert len(new) >= 2
    r = subprocess.run([sys.executable, "generate.py", "--model", str(tiny_model_dir), "--prompt", "Once upon a time",
                        "--max-new-tokens", "24", "--temperature", "0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == "Once upon a time" + tok.decode(new)
    assert f"{len(new)} tokens in" in r.stderr and "tokens/s" in r.stderr and "GB/s" in r.stderr


# --- a random model with GQA, tied embeddings, rope_theta 500000 and llama3 scaling ----------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_args):
    args = tiny_args(tie_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3, n_heads=8, n_kv_heads=2)
    model = random_model(args)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert "lm_head.weight" not in load_file(str(tmp_path / "m" / "model.safetensors"))
    back = Transformer.from_pretrained(tmp_path / "m")
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert back.lm_head.weight is back.embed_tokens.weight
    x = torch.randint(0, args.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(x), back(x))


def test_sharded_checkpoint_with_index_loads(tmp_path, tiny_args):
    model = random_model(tiny_args())
    model.save_pretrained(tmp_path / "m", max_shard_bytes=20_000)
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    back = Transformer.from_pretrained(tmp_path / "m")
    x = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(x), back(x))


def test_rope_parameters_and_rope_scaling_keys_agree(tiny_args):
    base = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 32, "intermediate_size": 96}
    old = ModelArgs.from_hf_config({**base, "rope_theta": 500000.0, "rope_scaling": LLAMA3})
    new = ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_theta": 500000.0, **LLAMA3}})
    assert old.rope_theta == new.rope_theta == 500000.0
    assert old.rope_scaling == new.rope_scaling


def test_llama3_rope_scaling_formula(tiny_args):
    """Against Meta's reference apply_scaling (llama3.1 model.py), written out here independently."""
    from model import rope_inv_freq
    import math
    args = tiny_args(rope_theta=500000.0, rope_scaling=LLAMA3, head_dim=16, n_heads=4, dim=64)
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    want = []
    for f in base.tolist():
        wl = 2 * math.pi / f
        if wl < 32 / 4.0:
            want.append(f)
        elif wl > 32 / 1.0:
            want.append(f / 8.0)
        else:
            s = (32 / wl - 1.0) / (4.0 - 1.0)
            want.append((1 - s) * f / 8.0 + s * f)
    torch.testing.assert_close(rope_inv_freq(args), torch.tensor(want), rtol=1e-6, atol=0)


def test_kv_cache_decoding_equals_full_sequence(tiny_args):
    args = tiny_args(tie_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3, n_heads=8, n_kv_heads=2)
    model = random_model(args)
    x = torch.randint(0, args.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(x)
        model.setup_cache(2, 24)
        parts = [model(x[:, :10], start_pos=0)] + [model(x[:, t:t + 1], start_pos=t) for t in range(10, 24)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


def test_batched_left_padded_greedy_equals_one_by_one(tiny_args):
    model = random_model(tiny_args(), seed=1)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    batched = generate_batch(model, prompts, 6)
    single = [generate(model, p, 6) for p in prompts]
    assert batched == single


# --- the embedded default: SmolLM2-135M-Instruct, llama.cpp Q4_1 GGUF ------------------------------

def numpy_q4_1(raw: np.ndarray) -> np.ndarray:
    """Independent decoder of llama.cpp's block_q4_1 {ggml_half d; ggml_half m; uint8 qs[16]}:
    x[j] = d*(qs[j] & 15) + m, x[j+16] = d*(qs[j] >> 4) + m."""
    rows = raw.shape[0]
    blk = raw.reshape(rows, -1, 20)
    d = blk[:, :, 0:2].copy().view(np.float16).astype(np.float32)
    m = blk[:, :, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blk[:, :, 4:20]
    lo, hi = (qs & 15).astype(np.float32), (qs >> 4).astype(np.float32)
    return np.concatenate([d * lo + m, d * hi + m], axis=2).reshape(rows, -1)


def numpy_q8_0(raw: np.ndarray) -> np.ndarray:
    """block_q8_0 {ggml_half d; int8 qs[32]}: x[j] = d*qs[j]."""
    rows = raw.shape[0]
    blk = raw.reshape(rows, -1, 34)
    d = blk[:, :, 0:2].copy().view(np.float16).astype(np.float32)
    return (d * blk[:, :, 2:].copy().view(np.int8).astype(np.float32)).reshape(rows, -1)


@pytest.fixture(scope="module")
def smollm(smollm_gguf):
    return Transformer.from_pretrained(smollm_gguf)


def test_smollm_dequantization_matches_numpy_decoder(smollm, smollm_gguf):
    from gguf import GGUFReader
    r = GGUFReader(smollm_gguf)
    t = {x.name: x for x in r.tensors}
    emb = numpy_q8_0(np.asarray(t["token_embd.weight"].data))
    assert torch.equal(smollm.embed_tokens.weight, torch.from_numpy(emb))
    assert smollm.lm_head.weight is smollm.embed_tokens.weight  # SmolLM2 ties its head to the Q8_0 embedding
    for name, ours, heads in [("blk.3.ffn_down.weight", smollm.layers[3].mlp.down_proj.weight, None),
                              ("blk.7.attn_q.weight", smollm.layers[7].self_attn.q_proj.weight, 9),
                              ("blk.7.attn_k.weight", smollm.layers[7].self_attn.k_proj.weight, 3)]:
        w = torch.from_numpy(numpy_q4_1(np.asarray(t[name].data)))
        if heads:  # llama.cpp stores q/k rows interleaved per head: [h0, h_{d/2}, h1, ...]
            hd = w.shape[0] // heads
            order = torch.arange(w.shape[0]).view(heads, hd // 2, 2).transpose(1, 2).reshape(-1)
            w = w[order]
        assert torch.equal(ours, w), name


@pytest.mark.parametrize("H,KV,dtype", [(9, 3, torch.float32), (4, 4, torch.float32), (8, 2, torch.bfloat16)])
def test_one_query_attention_equals_sdpa(H, KV, dtype):
    """The compiled decode step's attention against PyTorch's SDPA and a per-head loop (grouped-query)."""
    g = torch.Generator().manual_seed(0)
    B, S, hd = 2, 37, 64
    q = torch.randn(B, H, 1, hd, generator=g).to(dtype)
    k, v = (torch.randn(B, KV, S, hd, generator=g).to(dtype) for _ in range(2))
    got = one_query_attention(q, k, v).float()
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=KV != H)
    loop = torch.stack([torch.softmax(q[:, h].float() @ k[:, h // (H // KV)].float().transpose(-1, -2) / hd ** 0.5, -1)
                        @ v[:, h // (H // KV)].float() for h in range(H)], 1)  # [B, H, 1, hd]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.shape == (B, H, 1, hd)
    torch.testing.assert_close(got, sdpa, rtol=tol, atol=tol)
    torch.testing.assert_close(got, loop, rtol=tol, atol=tol)


def test_permute_qk_inverts():
    w = torch.randn(24, 5)
    assert torch.equal(permute_qk(permute_qk(w, 3, inverse=False), 3, inverse=True), w)
    # HF rotate_half rows (0..3 | 4..7) of one 8-row head interleave as 0,4,1,5,2,6,3,7 in GGUF
    assert permute_qk(torch.arange(8.0)[:, None], 1, inverse=False).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_smollm_completes_capital_of_france(smollm, smollm_gguf):
    tok = load_tokenizer(smollm_gguf)
    ids = tok.encode("The capital of France is")
    assert ids == [504, 3575, 282, 4649, 314]  # no BOS: the GGUF says add_bos_token = false
    assert tok.encode("2024") == [34, 32, 34, 36]  # the smollm pre-tokenizer splits digits one by one
    new = generate(smollm, ids, 4)
    assert "Paris" in tok.decode(new)


# --- bad input: one clear line on stderr, non-zero exit, no traceback ------------------------------

def run_generate(*args):
    r = subprocess.run([sys.executable, "generate.py", *args, "--prompt", "hi", "--max-new-tokens", "2"],
                       cwd=ROOT, capture_output=True, text=True)
    return r.returncode, r.stderr.strip()


def assert_clean_error(rc, err, *words):
    assert rc != 0
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in err, err


def test_missing_path(tmp_path):
    assert_clean_error(*run_generate("--model", str(tmp_path / "nope")), "does not exist")


def test_truncated_safetensors(tmp_path, tiny_model_dir):
    src = tiny_model_dir
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    (d / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    (d / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:5000])
    assert_clean_error(*run_generate("--model", str(d)), "model.safetensors")


def test_config_without_sizes(tmp_path, tiny_model_dir):
    src = tiny_model_dir
    d = tmp_path / "m"
    d.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    assert_clean_error(*run_generate("--model", str(d)), "hidden_size")


def test_gguf_with_unsupported_tensor_type(tmp_path):
    import gguf
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in [("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 64),
                 ("attention.head_count", 4), ("attention.head_count_kv", 4), ("context_length", 64)]:
        w.add_uint32(f"llama.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    # an IQ4_NL tensor (a non-affine lookup-table code): 32 weights per 18-byte block
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 18), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_clean_error(*run_generate("--model", str(path)), "IQ4_NL")


def test_from_pretrained_raises_user_error(tmp_path):
    with pytest.raises(UserError):
        Transformer.from_pretrained(tmp_path)
