"""The real peers read what we read and what we write: transformers' GGUF loader gives our logits on the same
file, and llama.cpp (llama-cpp-python) runs our merged exports to our merged logits. Each test skips when
its peer is not installed (requirements-bench.txt pins them; nothing here requires them)."""
from pathlib import Path

import numpy as np
import pytest
import torch

import quant
from conftest import SHARED, randomize_B
from export import export_gguf
from merge import merge_adapters
from model import Transformer
from qalora import add_adapters
from tokenizer import load_tokenizer

Q4KM = SHARED / "models" / "smollm2-q4km" / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
TEXT = ["The capital of France is Paris, and the capital of Italy is Rome. Germany's capital is Berlin, which "
        "lies on the river Spree; Spain's is Madrid, and Portugal's is", "def fibonacci(n):\n    if n < 2:\n        "
        "return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\ndef factorial(n):\n    result = 1\n    for"]


@pytest.fixture(scope="module")
def q4km():
    if not Q4KM.is_file():
        pytest.skip(f"{Q4KM} is absent")
    return Q4KM


def ids_for(path):
    tok = load_tokenizer(path)
    ids = [tok.encode(t) for t in TEXT]
    n = min(len(i) for i in ids)
    return torch.tensor([i[:n] for i in ids])


def test_q4_k_m_loads_as_codes_and_matches_transformers(q4km):
    transformers = pytest.importorskip("transformers")
    ours = Transformer.from_pretrained(q4km, keep_quantized=True)
    layers = [m for m in ours.modules() if isinstance(m, quant.QuantLinear)]
    assert len(layers) == 210 and {m.ggml_type for m in layers} == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    ids = ids_for(q4km)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(q4km.parent), gguf_file=q4km.name,
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel <= 1e-4, rel


def llama_cpp_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    out = []
    for row in ids.tolist():
        llm.reset()
        llm.eval(row)
        out.append(np.array(llm.scores[:len(row)], dtype=np.float32))
    return torch.from_numpy(np.stack(out))


def agreement(a, b):
    corr = np.corrcoef(a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy())[0, 1]
    return corr, (a.argmax(-1) == b.argmax(-1)).double().mean().item()


@pytest.mark.filterwarnings("ignore:rank")
@pytest.mark.parametrize("which", ["q4km", "embedded"])
def test_llama_cpp_reads_our_merged_export(which, request, tmp_path):
    pytest.importorskip("llama_cpp")
    path = Path(request.getfixturevalue("q4km" if which == "q4km" else "smollm_gguf"))
    model = Transformer.from_pretrained(path, keep_quantized=True)
    from export import offsetless_layers
    exclude = tuple(offsetless_layers(model))
    add_adapters(model, rank=8, alpha=16.0, exclude=exclude, pool_scale="mean")  # B below: a moderate update
    randomize_B(model, std=0.02)
    merge_adapters(model)
    out = export_gguf(model, tmp_path / "merged.gguf")
    assert out.stat().st_size <= 1.15 * path.stat().st_size
    ids = ids_for(path)
    with torch.no_grad():   # the file as we read it (its f16 biases): llama.cpp's arithmetic is what differs
        ours = Transformer.from_pretrained(out, keep_quantized=True)(ids)
    corr, argmax = agreement(llama_cpp_logits(out, ids), ours)
    with torch.no_grad():   # llama.cpp's own floor: the untouched source file against our exact decode of it
        src_corr, src_argmax = agreement(llama_cpp_logits(path, ids), Transformer.from_pretrained(
            path, keep_quantized=True)(ids))
    print(f"\nllama.cpp vs ours, {which}: merged export corr {corr:.5f} argmax {argmax:.3f}; "
          f"source file corr {src_corr:.5f} argmax {src_argmax:.3f}")
    assert argmax >= 0.9 and (corr >= 0.998 or corr >= src_corr - 5e-4)
