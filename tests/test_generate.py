"""Compiled decode steps (generate(compile=True), generate.py's default) against eager decoding: the golden
greedy text, the same greedy tokens for quantized models in fp32, the same logits within bf16 rounding in
bf16, batched decoding, and a model changed in place (a merge) seen by the next call."""
import json

import pytest
import torch

import kernels
import quant
from generate import decode_session, generate, generate_batch, lm_head, native_linears
from model import Transformer
from tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(not kernels.COMPILE, reason="QALORA_COMPILE=0: nothing is compiled")


def load(model_dir, bits=None, group_size=32, dtype=torch.float32):
    """A model directory (conftest's tiny random LLaMA, or stories260K for the golden text), RTN-quantized
    when bits is given."""
    model = Transformer.from_pretrained(model_dir, dtype=dtype)
    return quant.quantize_model(model, bits, group_size) if bits else model


def step_logits(model, ids, compile):
    """Prefill ids[:-1] eagerly, then the logits of one decode step on ids[-1] (compiled or eager)."""
    with torch.no_grad(), decode_session(model, 1, len(ids), compile) as blocks_fn:
        model.hidden_states(torch.tensor([ids[:-1]]), start_pos=0)
        h = model.hidden_states(torch.tensor([ids[-1:]]), start_pos=len(ids) - 1, blocks_fn=blocks_fn)
        return model.lm_head(h[0, -1]).float()


def test_compiled_greedy_matches_golden_text(stories_dir):
    golden = json.loads((stories_dir / "greedy.json").read_text())
    assert generate(load(stories_dir), golden["prompt_ids"], 64, compile=True) == golden["new_ids"]


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 32), (2, 16), (8, -1)])
def test_compiled_quantized_decode_equals_eager(tiny_model_dir, bits, group_size):
    model = load(tiny_model_dir, bits, group_size)
    ids = load_tokenizer(tiny_model_dir).encode("Once upon a time")
    assert generate(model, ids, 48, compile=True) == generate(model, ids, 48)
    ids = ids + generate(model, ids, 8)
    torch.testing.assert_close(step_logits(model, ids, True), step_logits(model, ids, False), rtol=1e-4, atol=1e-4)


def test_compiled_bf16_decode_within_tolerance(tiny_model_dir):
    model = load(tiny_model_dir, 4, 32, dtype=torch.bfloat16)
    ids = load_tokenizer(tiny_model_dir).encode("Once upon a time there was")
    x = torch.zeros(1, model.args.dim, dtype=torch.bfloat16)
    if kernels.gemv_available():  # one-row bf16 steps read the codes with the gemv's fixed-point rows
        assert kernels.choose_impl(x, model.layers[0].self_attn.q_proj) == "gemv"
    got, want = step_logits(model, ids, True), step_logits(model, ids, False)
    # inductor keeps fused bf16 intermediates in fp32, eager rounds each op: the two differ by bf16 rounding
    assert (got - want).norm() / want.norm() < 2e-2
    assert got.argmax() == want.argmax()


def test_compiled_batch_decode_equals_eager(tiny_model_dir):
    model = load(tiny_model_dir, 4, 32)
    tok = load_tokenizer(tiny_model_dir)
    prompts = [tok.encode(t) for t in ("Once upon a time", "The cat", "Lily and Tom went to the park")]
    assert generate_batch(model, prompts, 12, compile=True) == generate_batch(model, prompts, 12)
    many = prompts * 4  # 12 rows: more than kernels.GEMV_MAX_M, the dequantize-then-BLAS branch
    assert generate_batch(model, many, 6, compile=True) == generate_batch(model, many, 6)


def test_recompile_under_skipped_guards_falls_back(tiny_model_dir, monkeypatch):
    """With no warm-up steps the stance starts before the padded batch's second compile: torch raises on
    that recompile, and generate_batch repeats the step with full guards; the tokens stay the eager ones."""
    import generate as gen
    torch._dynamo.reset()
    gen._compiled.clear()
    monkeypatch.setattr(gen, "WARM_STEPS", 0)
    model = load(tiny_model_dir, 4, 32)
    tok = load_tokenizer(tiny_model_dir)
    prompts = [tok.encode(t) for t in ("Once upon a time", "The cat", "Lily and Tom went to the park")]
    assert generate_batch(model, prompts, 8, compile=True) == generate_batch(model, prompts, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_sees_biases_changed_in_place(tiny_model_dir, dtype):
    model = load(tiny_model_dir, 4, 32, dtype=dtype)
    ids = load_tokenizer(tiny_model_dir).encode("Once upon a time")
    before = step_logits(model, ids, True)
    with torch.no_grad():  # what merge.merge_adapters does: new biases, same codes
        for m in model.modules():
            if isinstance(m, quant.QuantLinear):
                m.biases.add_(0.05 * m.scales)
    after, eager = step_logits(model, ids, True), step_logits(model, ids, False)
    assert not torch.allclose(before, after, rtol=1e-2, atol=1e-2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (after - eager).norm() / eager.norm() < tol


def test_compiled_decode_with_unmerged_adapters(tiny_model_dir):
    from qalora import add_adapters
    from conftest import randomize_B
    model = load(tiny_model_dir, 4, 32)
    add_adapters(model, rank=2, alpha=4)
    randomize_B(model, std=0.3)
    model.eval()
    ids = load_tokenizer(tiny_model_dir).encode("Once upon a time")
    assert generate(model, ids, 32, compile=True) == generate(model, ids, 32)


def test_compiled_decode_with_explicit_impls(tiny_model_dir):
    model = load(tiny_model_dir, 4, 32)
    model.layers[0].self_attn.q_proj.impl = "reference"  # an explicit impl is kept inside the graph
    model.layers[1].self_attn.k_proj.impl = "native"     # bf16 inside an fp32 model, as asked
    ids = load_tokenizer(tiny_model_dir).encode("Once upon a time")
    torch.testing.assert_close(step_logits(model, ids, True), step_logits(model, ids, False), rtol=1e-4, atol=1e-4)


def test_q8_0_head_kept_as_codes(smollm_gguf, tmp_path):
    """The embedded file's tied Q8_0 embedding: decode's head reads its 8-bit codes (the same values as the
    float embedding, a quarter of the bytes), which checkpoints do not save."""
    if not kernels.gemv_available():
        pytest.skip("the C++ gemv is not built here")
    model = Transformer.from_pretrained(smollm_gguf, keep_quantized=True)
    assert model.head_codes is not None and model.head_codes.dtype == torch.uint8
    w = quant.dequantize(model.head_codes, model.head_scales, model.head_biases, 32)
    assert torch.equal(w, model.embed_tokens.weight)
    h = torch.randn(3, model.args.dim)
    with torch.no_grad():
        torch.testing.assert_close(lm_head(model, h), model.lm_head(h), rtol=1e-5, atol=1e-4)
    assert not any(k.startswith("head_") for k in model.state_dict())
    reloaded = Transformer.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert reloaded.head_codes is None    # a checkpoint dir holds the float embedding only


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_compiled_one_row_head_equals_lm_head(tiny_model_dir, dtype, tol):
    model = load(tiny_model_dir, dtype=dtype)
    h = torch.randn(1, model.args.dim).to(dtype)
    with torch.no_grad():
        want = model.lm_head(h).float()
        got = lm_head(model, h, compiled=True).float()
        assert lm_head(model, torch.cat([h, h]), compiled=True).shape == (2, model.args.vocab_size)  # BLAS
    assert got.shape == want.shape
    assert (got - want).norm() / want.norm() < tol


def test_compiled_decode_step_compiles_once_for_every_position(tiny_model_dir):
    """The position is dynamic from the first compile: later positions reuse the graph (no recompile)."""
    import generate as gen
    torch._dynamo.reset()
    gen._compiled.clear()
    model = load(tiny_model_dir)  # float linears: the compiled graph (plain quantized blocks: decode_step)
    ids = load_tokenizer(tiny_model_dir).encode("Once upon a time")
    # (a cache one longer than used, as in generate(): a full cache's slice is contiguous, another graph)
    with torch.no_grad(), decode_session(model, 1, len(ids) + 5, compile=True) as blocks_fn:
        model.hidden_states(torch.tensor([ids]), start_pos=0)
        for i in range(4):
            tok = torch.tensor([[ids[-1]]])
            if i == 0:
                model.hidden_states(tok, start_pos=len(ids), blocks_fn=blocks_fn)  # compiles
            else:
                with torch.compiler.set_stance("fail_on_recompile"):
                    model.hidden_states(tok, start_pos=len(ids) + i, blocks_fn=blocks_fn)


def packed_stack(model, dtype, final_norm=False):
    """Every block of the model packed for kernels.decode_step (each must allow it), and the final norm."""
    blocks = []
    for layer in model.layers:
        lins = native_linears(layer, dtype)
        assert lins is not None
        a = layer.self_attn
        blocks.append((layer.input_layernorm.weight, layer.post_attention_layernorm.weight, lins, a.cache_k, a.cache_v))
    return kernels.pack_blocks(blocks, model.norm.weight if final_norm else None)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 16), (8, 64)])
def test_decode_step_equals_block_forwards(tiny_model_dir, dtype, tol, bits, group_size):
    """kernels.decode_step (one C++ call for the whole stack and one token) against model.Block's own
    forwards in turn (SDPA over the cache), one token after a 5-token prefill, 4 heads on 2 kv heads: the
    output (also with the final norm) and every block's cache row; and 1 thread gives exactly what 2 threads
    give."""
    if not kernels.gemv_available():
        pytest.skip("the C++ kernels are not built here")
    model = load(tiny_model_dir, bits, group_size, dtype=dtype)
    torch.manual_seed(0)
    pos, dim, attn = 5, model.args.dim, [layer.self_attn for layer in model.layers]
    rope = lambda p: [t.to(dtype) for t in model.rope(p)]  # noqa: E731
    with torch.no_grad():
        model.setup_cache(1, 16)
        h = torch.randn(1, pos, dim).to(dtype)
        for layer in model.layers:  # prefill 0..4
            h = layer(h, *rope(torch.arange(pos)), 0, None)
        before = [(a.cache_k.clone(), a.cache_v.clone()) for a in attn]
        x, (cos, sin) = torch.randn(1, 1, dim).to(dtype), rope(torch.tensor([pos]))
        want = x
        for layer in model.layers:
            want = layer(want, cos, sin, pos, None)
        want_cache = [(a.cache_k.clone(), a.cache_v.clone()) for a in attn]
        want_normed = model.norm(want)
        got, threads = {}, torch.get_num_threads()
        for n, final in ((1, False), (2, False), (2, True)):
            for a, (k, v) in zip(attn, before):
                a.cache_k.copy_(k), a.cache_v.copy_(v)
            torch.set_num_threads(n)
            try:
                got[n, final] = kernels.decode_step(x, packed_stack(model, dtype, final), cos, sin, pos,
                                                    attn[0].n_heads, model.layers[0].input_layernorm.eps)
            finally:
                torch.set_num_threads(threads)
        got_cache = [(a.cache_k, a.cache_v) for a in attn]
        model.clear_cache()
    assert torch.equal(got[1, False], got[2, False])
    assert (got[2, True].float() - want_normed.float()).norm() / want_normed.float().norm() < tol
    got = got[2, False]
    assert got.shape == x.shape and got.dtype == dtype
    assert (got.float() - want.float()).norm() / want.float().norm() < tol
    for gc, wc, bc in zip(got_cache, want_cache, before):
        for g, w, b in zip(gc, wc, bc):
            assert torch.equal(g[:, :, :pos], b[:, :, :pos])  # earlier positions untouched
            assert (g[:, :, pos].float() - w[:, :, pos].float()).norm() / w[:, :, pos].float().norm() < tol


def test_decode_session_runs_plain_quantized_blocks_as_one_call(tiny_tokenizer, monkeypatch):
    """A quantized model's one-token step is one decode_step call for all its blocks; a block that does not
    allow it (an unmerged adapter, another impl) takes the compiled graph and splits the stack into runs
    around it; the tokens are the eager ones either way."""
    if not kernels.gemv_available():
        pytest.skip("the C++ kernels are not built here")
    from conftest import randomize_B, tiny_llama
    from qalora import add_adapters
    calls, real = [], kernels.decode_step
    monkeypatch.setattr(kernels, "decode_step", lambda h, packed, *a: calls.append(len(packed[0]) // 2) or real(h, packed, *a))
    model = quant.quantize_model(tiny_llama(tiny_tokenizer.vocab_size, n_layers=3), 4, 32)
    ids = tiny_tokenizer.encode("Once upon a time")
    assert generate(model, ids, 6, compile=True) == generate(model, ids, 6)
    assert calls and set(calls) == {3}  # one call per token, all three blocks
    calls.clear()
    model.layers[1].self_attn.q_proj.impl = "eager"  # the middle block takes the graph
    assert generate(model, ids, 6, compile=True) == generate(model, ids, 6)
    assert calls and set(calls) == {1} and len(calls) % 2 == 0  # blocks 0 and 2, a call each
    calls.clear()
    add_adapters(model, rank=2, alpha=4)
    randomize_B(model, std=0.3)
    model.eval()
    assert native_linears(model.layers[0], torch.float32) is None
    assert generate(model, ids, 6, compile=True) == generate(model, ids, 6)
    assert calls == []


def test_decode_step_rejects_wrong_inputs(tiny_model_dir):
    if not kernels.gemv_available():
        pytest.skip("the C++ kernels are not built here")
    model = load(tiny_model_dir, 4, 32)
    model.setup_cache(1, 8)
    packed = packed_stack(model, torch.float32)
    cos, sin = model.rope(torch.tensor([0]))
    x, heads = torch.randn(1, 1, model.args.dim), model.layers[0].self_attn.n_heads
    step = lambda x, packed, pos=0: kernels.decode_step(x, packed, cos, sin, pos, heads, 1e-5)  # noqa: E731
    norms, caches, q, s, b, bits, groups = packed
    with pytest.raises(RuntimeError, match="seven linears"):
        step(x, (norms, caches, q[:-1], s[:-1], b[:-1], bits[:-1], groups[:-1]))
    with pytest.raises(RuntimeError, match="shapes do not match"):
        step(x, packed, pos=8)  # past the cache
    with pytest.raises(RuntimeError, match="rows, not"):
        step(x, (norms, caches, q[1:2] + q[1:], s[1:2] + s[1:], b[1:2] + b[1:], bits, groups))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        step(x.double(), packed)
    with pytest.raises(RuntimeError, match="caches must be"):
        step(x, (norms, caches[:1] + [caches[1][:, :, :4].contiguous()] + caches[2:], q, s, b, bits, groups))
    model.clear_cache()


def test_weight_bytes_counts_what_a_decode_step_reads(tiny_tokenizer):
    """Every weight once, not the embedding table (a row of it is read); a tied head kept as Q8_0 codes counts
    its codes, scales and biases instead of the table it was read from."""
    from conftest import tiny_llama
    from generate import weight_bytes
    model = tiny_llama(tiny_tokenizer.vocab_size)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    body = nbytes(p for n, p in model.named_parameters() if not n.startswith(("embed_tokens", "lm_head")))
    assert weight_bytes(model) == body + nbytes([model.lm_head.weight])
    tied = tiny_llama(tiny_tokenizer.vocab_size, tie_embeddings=True)
    assert weight_bytes(tied) == body + nbytes([tied.embed_tokens.weight])
    V, D = tied.embed_tokens.weight.shape
    tied.head_codes = torch.zeros(V, D, dtype=torch.uint8)
    tied.head_scales, tied.head_biases = torch.zeros(V, D // 32), torch.zeros(V, D // 32)
    assert weight_bytes(tied) == body + V * D + 2 * 4 * V * D // 32
