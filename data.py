"""
Instruction data for fine-tuning: Alpaca JSON/JSONL records, prompt templates,
response-only loss masks, built-in synthetic tasks with an exact-match held-out
split, a checkpointable batch sampler, and plain-text calibration / perplexity
windows.

A record is {"instruction": str, "input": str (optional), "output": str}. It
becomes one token sequence `prompt + response + eos`; the loss is taken on the
response tokens only (labels are -100 on the prompt and on padding), so the
model learns to answer, not to repeat the question.
"""
import json
import math
import random
import re
from dataclasses import dataclass, field

import torch

from cli import UserError, parse_jsonl, read_utf8

IGNORE = -100  # label value that cross_entropy(ignore_index=IGNORE) skips

# -----------------------------------------------------------------------------
# loading records: a JSON list (errors name the record index) or JSONL (errors
# name the 1-based line number)

def _check_record(rec, where):
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected an object with instruction/input/output, got {type(rec).__name__}")
    for key in ("instruction", "output"):
        if key not in rec:
            raise UserError(f"{where}: missing field '{key}' (records need instruction, output and optionally input)")
    for key in ("instruction", "input", "output"):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise UserError(f"{where}: field '{key}' must be a string, got {type(rec[key]).__name__}")
    return {"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec["output"]}


def load_records(path):
    """Alpaca-format records from `path` (.json list or .jsonl), validated."""
    text = read_utf8(path, "data")
    is_jsonl = str(path).endswith((".jsonl", ".ndjson")) or not text.lstrip().startswith("[")
    if is_jsonl:
        records = [_check_record(rec, f"{path} line {lineno}") for lineno, rec in parse_jsonl(text, path)]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})")
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        records = [_check_record(rec, f"{path} record {i}") for i, rec in enumerate(data)]
    if not records:
        raise UserError(f"{path}: no records (empty dataset)")
    return records

# -----------------------------------------------------------------------------
# prompt templates

# the Stanford Alpaca templates, verbatim (github.com/tatsu-lab/stanford_alpaca, train.py)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


def _chatml_system(chat_template):
    """The default system message a ChatML template inserts, or None."""
    m = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", chat_template, re.S)
    return m.group(1) if m else None


def render(rec, template, tok):
    """(prompt text, response suffix text) for one record. The response is
    `output` followed by the template's end-of-turn text ('' for alpaca: the
    eos id is appended as a token)."""
    if template == "alpaca":
        fmt = ALPACA_WITH_INPUT if rec["input"] else ALPACA_NO_INPUT
        return fmt.format(**rec), ""
    if template == "chat":
        # jinja2 is not a dependency: we render the one chat format we support,
        # ChatML (SmolLM2, Qwen, ...), as its template would for [system?, user, assistant]
        ct = getattr(tok, "chat_template", None)
        if not ct:
            raise UserError("--template chat: this tokenizer ships no chat template; use --template alpaca")
        if "<|im_start|>" not in ct:
            raise UserError("--template chat: only ChatML chat templates (<|im_start|>) are supported; use --template alpaca")
        user = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")
        system = _chatml_system(ct)
        prompt = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        prompt += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        return prompt, "<|im_end|>"
    raise UserError(f"unknown template '{template}': choose one of {', '.join(TEMPLATES)}")

# -----------------------------------------------------------------------------
# tokenized examples with response-only labels

@dataclass
class Example:
    ids: list          # prompt + response token ids (truncated to seq_len)
    n_prompt: int      # the first n_prompt positions carry no loss
    answer: str        # the record's output, for exact match

    @property
    def labels(self):
        return [IGNORE] * self.n_prompt + self.ids[self.n_prompt:]

    @property
    def prompt(self):
        return self.ids[:self.n_prompt]


@dataclass
class Truncation:
    n_examples: int = 0   # examples that lost tokens
    n_tokens: int = 0     # tokens cut in total
    n_dropped: int = 0    # examples left without any response token (dropped)

    def __str__(self):
        return (f"truncated {self.n_examples} examples ({self.n_tokens} tokens cut), "
                f"dropped {self.n_dropped} with no response left")


def encode(rec, tok, template="alpaca"):
    """One record -> Example (untruncated). The eos id ends the response so the
    model learns to stop."""
    prompt, suffix = render(rec, template, tok)
    p = tok.encode(prompt)                    # bos as the tokenizer wants it
    r = tok.encode(rec["output"] + suffix, bos=False)
    if template == "alpaca" or not r or r[-1] != tok.eos_id:
        r = r + [tok.eos_id]
    return Example(ids=p + r, n_prompt=len(p), answer=rec["output"])


def build_examples(records, tok, template="alpaca", seq_len=None):
    """Records -> (examples, Truncation). Sequences longer than seq_len are cut
    on the right; an example whose response is cut away entirely is dropped."""
    out, trunc = [], Truncation()
    for rec in records:
        ex = encode(rec, tok, template)
        if seq_len is not None and len(ex.ids) > seq_len:
            trunc.n_examples += 1
            trunc.n_tokens += len(ex.ids) - seq_len
            ex.ids = ex.ids[:seq_len]
            if ex.n_prompt >= seq_len:
                trunc.n_dropped += 1
                continue
        out.append(ex)
    if not out:
        raise UserError(f"no usable examples: all {len(records)} were truncated away "
                        f"(seq_len {seq_len}); raise --seq-len")
    return out, trunc


def collate(examples, pad_id):
    """Right-pad to the longest in the batch -> tokens [B, T] int64, labels [B, T] int64.
    Labels are aligned with tokens (labels[t] is token t or IGNORE); the trainer
    shifts them: logits at t predict labels[t + 1]."""
    T = max(len(ex.ids) for ex in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, ex in enumerate(examples):
        tokens[i, :len(ex.ids)] = torch.tensor(ex.ids)
        labels[i, :len(ex.ids)] = torch.tensor(ex.labels)
    return tokens, labels


def n_targets(examples):
    """Number of loss positions (response tokens) in these examples."""
    return sum(len(ex.ids) - ex.n_prompt for ex in examples)

# -----------------------------------------------------------------------------
# built-in synthetic tasks: short prompts (no "input" field: the shorter Alpaca template), short
# answers, generated from a seed

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _addition(rng):
    a, b = rng.randint(10, 999), rng.randint(10, 99)
    return {"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}


def _reverse(rng):
    xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 5))]
    return {"instruction": f"Reverse the list: {' '.join(xs)}", "input": "", "output": " ".join(reversed(xs))}


def _sort(rng):
    xs = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
    return {"instruction": f"Sort in ascending order: {' '.join(xs)}", "input": "", "output": " ".join(sorted(xs))}


def _count(rng):
    word = "".join(rng.choice("abc") for _ in range(rng.randint(4, 7)))
    ch = rng.choice("abc")
    return {"instruction": f"How many times does the letter '{ch}' appear in '{word}'?", "input": "",
            "output": str(word.count(ch))}


def _larger(rng):
    a, b = rng.sample(range(100, 1000), 2)
    return {"instruction": f"Which number is larger, {a} or {b}?", "input": "", "output": str(max(a, b))}


TASKS = {"addition": _addition, "reverse": _reverse, "sort": _sort, "count": _count, "larger": _larger}


def synthetic_splits(seed=0, n_train=2000, n_heldout=64, tasks=tuple(TASKS)):
    """Deterministic (train, heldout) record lists: the tasks in round robin, every
    record distinct, no held-out instruction+input also in train."""
    rng = random.Random(seed)
    n = n_train + n_heldout
    seen, records = set(), []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise UserError(f"cannot draw {n} distinct synthetic records from tasks {tasks}; ask for fewer")
        rec = TASKS[tasks[len(records) % len(tasks)]](rng)
        key = (rec["instruction"], rec["input"])
        if key in seen:
            continue
        seen.add(key)
        records.append(rec)
    # interleaved split: every task is represented in held-out
    stride = n // n_heldout
    held_idx = set(range(0, stride * n_heldout, stride))
    heldout = [r for i, r in enumerate(records) if i in held_idx]
    train = [r for i, r in enumerate(records) if i not in held_idx]
    return train, heldout


def split_records(records, n_heldout, seed=0):
    """A deterministic held-out split of user data: n_heldout random records."""
    if len(records) < 2:
        raise UserError(f"need at least 2 records to hold some out, got {len(records)}")
    n_heldout = max(1, min(n_heldout, len(records) // 10 or 1))
    perm = list(range(len(records)))
    random.Random(seed).shuffle(perm)
    held = set(perm[:n_heldout])
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])

# -----------------------------------------------------------------------------
# sampler: a fresh seeded permutation per epoch; the position (epoch, index) is the
# whole state, so a resumed run reads exactly the examples an uninterrupted one would

@dataclass
class Sampler:
    n: int
    seed: int = 0
    epoch: int = 0
    index: int = 0
    _perm: list = field(default=None, repr=False)

    def _permutation(self):
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def take(self, k):
        """The next k example indices (wrapping into the next epoch)."""
        out = []
        while len(out) < k:
            perm = self._permutation()
            m = min(k - len(out), self.n - self.index)
            out += perm[self.index:self.index + m]
            self.index += m
            if self.index == self.n:
                self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self):
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s):
        if s["n"] != self.n or s["seed"] != self.seed:
            raise UserError(f"checkpoint was taken on a dataset of {s['n']} examples with seed {s['seed']}, "
                            f"this run has {self.n} with seed {self.seed}: resume with the same --data/--seed")
        self.epoch, self.index, self._perm = s["epoch"], s["index"], None


def shard(indices, rank, world_size, micro_batch):
    """This rank's micro-batches of one optimizer step's global index list.
    Micro-batch m of rank r is indices[(m*world + r)*micro_batch : +micro_batch],
    so N ranks with micro_batch b see the same examples, micro-step by micro-step,
    as 1 rank with micro_batch N*b."""
    per_micro = world_size * micro_batch
    assert len(indices) % per_micro == 0, f"{len(indices)} indices not divisible by {world_size}x{micro_batch}"
    return [indices[m * per_micro + rank * micro_batch: m * per_micro + (rank + 1) * micro_batch]
            for m in range(len(indices) // per_micro)]

# -----------------------------------------------------------------------------
# what exact match compares (eval.exact_match)

def normalize_answer(text):
    """The first line, stripped."""
    return text.strip().split("\n")[0].strip()


# -----------------------------------------------------------------------------
# plain text: calibration windows (quantization) and perplexity windows

def read_text(path):
    """A non-empty UTF-8 text file (calibration and perplexity text)."""
    text = read_utf8(path)
    if not text.strip():
        raise UserError(f"{path}: empty text file")
    return text


def _tokens(tok, text, need):
    """Token ids of text, encoding only about as much as is needed (big files)."""
    chars = max(4096, need * 8)
    while True:
        ids = tok.encode(text[:chars], bos=False)
        if len(ids) >= need or chars >= len(text):
            return ids
        chars *= 2


def calibration_windows(tok, path, n=128, seq_len=512, seed=0):
    """n random windows of seq_len tokens from a text file -> LongTensor [n, seq_len]
    (GPTQ's calibration recipe: random crops of a corpus). Only the first 2·n·seq_len tokens of the file
    are tokenized and cropped from (WikiText-2 valid, 128 x 256: the first 65,536 of its 273,868 SmolLM2 tokens)."""
    ids = _tokens(tok, read_text(path), need=max(seq_len * n, seq_len + 1) * 2)
    if len(ids) < seq_len + 1:
        raise UserError(f"{path}: only {len(ids)} tokens, need more than {seq_len} for calibration windows")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=g).tolist()
    t = torch.tensor(ids, dtype=torch.long)
    return torch.stack([t[s:s + seq_len] for s in starts])  # [n, seq_len]


def perplexity_windows(tok, path, seq_len=512, max_windows=None):
    """Consecutive non-overlapping windows of seq_len tokens -> LongTensor [n, seq_len]."""
    text = read_text(path)
    need = math.inf if max_windows is None else seq_len * max_windows
    ids = tok.encode(text, bos=False) if need == math.inf else _tokens(tok, text, need)
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"{path}: only {len(ids)} tokens, less than one window of {seq_len}")
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)
