"""data.py: record loading and its errors, templates, response-only masks,
truncation, synthetic tasks, the sampler, text windows."""
import json

import pytest
import torch

import data
from model import UserError


class CharTok:
    """A character-level tokenizer: id = ord(c) + 3; bos 1, eos 2, pad 0."""
    bos_id, eos_id, vocab_size, add_bos = 1, 2, 300, True
    chat_template = None

    def encode(self, text, bos=None):
        bos = self.add_bos if bos is None else bos
        return ([self.bos_id] if bos else []) + [ord(c) + 3 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


# ---- loading and errors ------------------------------------------------------

def test_load_json_and_jsonl(tmp_path):
    recs = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "e"}]
    j = write(tmp_path, "d.json", json.dumps(recs))
    l = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    want = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "input": "", "output": "e"}]
    assert data.load_records(j) == want
    assert data.load_records(l) == want


def test_malformed_jsonl_names_line(tmp_path):
    p = write(tmp_path, "bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": }\n')
    with pytest.raises(UserError, match=r"line 3: invalid JSON"):
        data.load_records(p)
    p = write(tmp_path, "bad2.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(UserError, match=r"line 2: missing field 'output'"):
        data.load_records(p)


def test_malformed_json_names_record(tmp_path):
    p = write(tmp_path, "bad.json", json.dumps([{"instruction": "a", "output": "b"}, {"output": "x"}]))
    with pytest.raises(UserError, match=r"record 1: missing field 'instruction'"):
        data.load_records(p)
    p = write(tmp_path, "bad2.json", json.dumps([{"instruction": "a", "output": 3}]))
    with pytest.raises(UserError, match=r"record 0: field 'output' must be a string"):
        data.load_records(p)


def test_empty_and_missing(tmp_path):
    with pytest.raises(UserError, match="empty dataset"):
        data.load_records(write(tmp_path, "e.json", "[]"))
    with pytest.raises(UserError, match="empty dataset"):
        data.load_records(write(tmp_path, "e.jsonl", "\n"))
    with pytest.raises(UserError, match="not found"):
        data.load_records(tmp_path / "nope.json")


def test_alpaca_1k_loads(shared_dir):
    recs = data.load_records(shared_dir / "data" / "alpaca_data_1k.json")
    assert len(recs) == 1000 and all(set(r) == {"instruction", "input", "output"} for r in recs)

# ---- templates and masks -------------------------------------------------------

def test_alpaca_template_and_response_mask():
    tok = CharTok()
    rec = {"instruction": "Add 1 and 2.", "input": "", "output": "3"}
    ex = data.encode(rec, tok)
    prompt = data.ALPACA_NO_INPUT.format(**rec)
    assert prompt.endswith("### Instruction:\nAdd 1 and 2.\n\n### Response:\n")
    assert ex.ids == tok.encode(prompt) + tok.encode("3", bos=False) + [tok.eos_id]
    assert ex.n_prompt == len(prompt) + 1  # + bos
    labels = ex.labels
    assert labels[:ex.n_prompt] == [data.IGNORE] * ex.n_prompt
    assert labels[ex.n_prompt:] == [ord("3") + 3, tok.eos_id]
    with_input = data.render({"instruction": "Reverse.", "input": "a b", "output": "b a"}, "alpaca", tok)[0]
    assert "paired with an input" in with_input and "### Input:\na b\n\n### Response:\n" in with_input


def test_collate_pads_right_and_masks_padding():
    tok = CharTok()
    exs = [data.encode({"instruction": "x", "input": "", "output": o}, tok) for o in ("ab", "abcdef")]
    tokens, labels = data.collate(exs, pad_id=0)
    assert tokens.shape == labels.shape == (2, len(exs[1].ids))
    n0 = len(exs[0].ids)
    assert tokens[0, n0:].eq(0).all() and labels[0, n0:].eq(data.IGNORE).all()
    for i, ex in enumerate(exs):
        assert labels[i].ne(data.IGNORE).sum().item() == len(ex.ids) - ex.n_prompt
        assert tokens[i, :len(ex.ids)].tolist() == ex.ids
    assert data.n_targets(exs) == (2 + 1) + (6 + 1)


def test_chat_template_chatml():
    tok = CharTok()
    with pytest.raises(UserError, match="no chat template"):
        data.render({"instruction": "hi", "input": "", "output": "yo"}, "chat", tok)
    tok.chat_template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                         "{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}{% endif %}"
                         "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    prompt, suffix = data.render({"instruction": "hi", "input": "there", "output": "yo"}, "chat", tok)
    assert prompt == ("<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nhi\n\nthere<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert suffix == "<|im_end|>"
    tok.chat_template = tok.chat_template.replace("\\n", "\n")  # real newlines, as in SmolLM2's GGUF
    assert data.render({"instruction": "hi", "input": "", "output": "yo"}, "chat", tok)[0].startswith(
        "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
    tok.chat_template = "{{ bos_token }}[INST] ..."
    with pytest.raises(UserError, match="ChatML"):
        data.render({"instruction": "hi", "input": "", "output": "yo"}, "chat", tok)
    with pytest.raises(UserError, match="unknown template"):
        data.render({"instruction": "hi", "input": "", "output": "yo"}, "vicuna", tok)


def test_truncation_counts():
    tok = CharTok()
    recs = [{"instruction": "x", "input": "", "output": "y" * n} for n in (1, 50)]
    n_prompt = data.encode(recs[0], tok).n_prompt
    exs, tr = data.build_examples(recs, tok, seq_len=n_prompt + 10)
    assert len(exs) == 2 and tr.n_examples == 1 and tr.n_tokens == (50 + 1) - 10 and tr.n_dropped == 0
    assert len(exs[1].ids) == n_prompt + 10 and exs[1].labels[-1] == ord("y") + 3
    exs, tr = data.build_examples(recs, tok, seq_len=n_prompt + 2)
    assert tr.n_examples == 1 and "truncated 1 examples" in str(tr)
    with pytest.raises(UserError, match="truncated away"):
        data.build_examples(recs, tok, seq_len=5)
    exs, tr = data.build_examples(recs + [{"instruction": "x" * 200, "input": "", "output": "y"}], tok,
                                  seq_len=n_prompt + 60)
    assert len(exs) == 2 and tr.n_dropped == 1


def test_real_tokenizer_masks(tiny_model_dir):
    """A sentencepiece tokenizer from a model directory (conftest's, trained in the test session): BOS first,
    EOS last, the response decodes back to the output, for synthetic and Alpaca records (with an input)."""
    from conftest import TINY_RECORDS
    from tokenizer import load_tokenizer
    tok = load_tokenizer(str(tiny_model_dir))
    train, _ = data.synthetic_splits(seed=0, n_train=20, n_heldout=4)
    train = train + TINY_RECORDS
    exs, _ = data.build_examples(train, tok, seq_len=256)
    assert len(exs) == len(train)
    for rec, ex in zip(train, exs):
        assert ex.ids[0] == tok.bos_id and ex.ids[-1] == tok.eos_id
        assert tok.decode(ex.ids[ex.n_prompt:-1]).strip() == rec["output"]
        assert tok.decode(ex.prompt).endswith("### Response:")  or tok.decode(ex.prompt).endswith("### Response:\n")

# ---- synthetic tasks -------------------------------------------------------------

def test_synthetic_deterministic_and_disjoint():
    a = data.synthetic_splits(seed=3, n_train=300, n_heldout=40)
    b = data.synthetic_splits(seed=3, n_train=300, n_heldout=40)
    c = data.synthetic_splits(seed=4, n_train=300, n_heldout=40)
    assert a == b and a != c
    train, held = a
    assert len(train) == 300 and len(held) == 40
    assert all(r["input"] == "" for r in train + held)
    keys = {(r["instruction"], r["input"]) for r in train}
    assert not keys & {(r["instruction"], r["input"]) for r in held}
    kinds = {r["instruction"].split()[0] for r in held}
    assert len(kinds) >= 4  # every task appears in held-out


def test_synthetic_answers_correct():
    train, held = data.synthetic_splits(seed=1, n_train=200, n_heldout=20)
    for r in train + held:
        ins, inp, out = r["instruction"], r["input"], r["output"]
        if ins.startswith("What is") and "+" in ins:
            a, b = ins[len("What is "):-1].split(" + ")
            assert int(out) == int(a) + int(b)
        elif ins.startswith("Reverse"):
            assert out.split() == ins.split(": ")[1].split()[::-1]
        elif ins.startswith("Sort"):
            assert out.split() == sorted(ins.split(": ")[1].split())
        elif ins.startswith("How many"):
            ch, word = ins.split("'")[1], ins.split("'")[3]
            assert int(out) == word.count(ch)
        else:
            a, b = ins[len("Which number is larger, "):-1].split(" or ")
            assert int(out) == max(int(a), int(b))

# ---- sampler ---------------------------------------------------------------------

def test_sampler_epochs_and_resume():
    s = data.Sampler(n=10, seed=5)
    first = s.take(7) + s.take(7)  # crosses into epoch 1
    assert sorted(first[:10]) == list(range(10)) and s.epoch == 1 and s.index == 4
    state = s.state_dict()
    rest = s.take(9)
    s2 = data.Sampler(n=10, seed=5)
    s2.load_state_dict(state)
    assert s2.take(9) == rest
    with pytest.raises(UserError, match="same --data/--seed"):
        data.Sampler(n=11, seed=5).load_state_dict(state)


def test_shard_matches_single_process():
    idx = list(range(16))
    one = data.shard(idx, 0, 1, 4)                 # 4 micro-batches of 4
    two = [data.shard(idx, r, 2, 2) for r in range(2)]
    for m in range(4):
        assert two[0][m] + two[1][m] == one[m]

# ---- text windows ----------------------------------------------------------------

def test_text_windows(tmp_path):
    tok = CharTok()
    p = write(tmp_path, "t.txt", "abcdefghij" * 30)
    w = data.perplexity_windows(tok, p, seq_len=32)
    assert w.shape == (300 // 32, 32) and w[0, 0].item() == ord("a") + 3
    assert data.perplexity_windows(tok, p, seq_len=32, max_windows=2).shape == (2, 32)
    c1 = data.calibration_windows(tok, p, n=5, seq_len=16, seed=0)
    assert c1.shape == (5, 16) and torch.equal(c1, data.calibration_windows(tok, p, n=5, seq_len=16, seed=0))
    with pytest.raises(UserError, match="less than one window"):
        data.perplexity_windows(tok, p, seq_len=1000)
    with pytest.raises(UserError, match="empty"):
        data.read_text(write(tmp_path, "e.txt", "  \n"))


def test_chat_template_smollm2(smollm_gguf):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(smollm_gguf)
    ex = data.encode({"instruction": "What is 2 + 3?", "input": "", "output": "5"}, tok, "chat")
    assert tok.decode(ex.prompt) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                                     "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                                     "<|im_start|>assistant\n")
    assert ex.ids[ex.n_prompt:] == tok.encode("5", bos=False) + [tok.eos_id]  # <|im_end|> is the eos
    assert ex.labels[:ex.n_prompt] == [data.IGNORE] * ex.n_prompt
