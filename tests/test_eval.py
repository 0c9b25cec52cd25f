"""eval.py's multiple-choice and exact-match scoring: hand-computed scores, the exact MMLU prompt, the
task files' parsing, and log-likelihoods against a naive per-token computation."""
import json
import math

import pytest
import torch

import eval as E

# -----------------------------------------------------------------------------
# scoring against hand-computed examples


def test_score_mc_three_choices_by_hand():
    # choices' character lengths 1, 4, 2 (the delimiter " " is not counted, as lm-eval-harness);
    # log-likelihoods of " a", " bbbb", " cc": -3, -4, -2.5
    # acc:      argmax(-3, -4, -2.5) = 2            -> wrong (gold 1)
    # acc_norm: argmax(-3, -1, -1.25) = 1           -> right
    item = E.MCItem("Q:", ["a", "bbbb", "cc"], gold=1)
    assert item.continuations == [" a", " bbbb", " cc"]
    r = E.score_mc([item], [-3.0, -4.0, -2.5])
    assert (r["acc"], r["acc_norm"], r["n"]) == (0.0, 1.0, 1)
    assert r["acc_stderr"] == 0.0 and r["acc_norm_stderr"] == 0.0


def test_score_mc_accuracy_and_stderr_by_hand():
    items = [E.MCItem("Q:", ["a", "bbbb", "cc"], 1),          # acc wrong, acc_norm right (above)
             E.MCItem("Q:", ["x", "y", "z"], 0),               # both right: -1 > -2 > -3
             E.MCItem("Q:", ["xx", "y", "z"], 2),              # both right: -0.5 is the best either way
             E.MCItem("Q:", ["x", "yyyyyyy", "z"], 0)]         # both wrong: acc picks z (-1), acc_norm
    # sees -2, -1, -1 per character and the tie goes to the first of the two: yyyyyyy
    lls = [-3.0, -4.0, -2.5, -1.0, -2.0, -3.0, -3.0, -2.0, -0.5, -2.0, -7.0, -1.0]
    r = E.score_mc(items, lls)
    assert r["acc"] == 0.5 and r["acc_norm"] == 0.75 and r["n"] == 4
    assert r["acc_stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 4))          # 0.25
    assert r["acc_norm_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))   # 0.2165
    assert E.stderr(0.5, 4) == 0.25


def test_score_mc_ties_go_to_the_first_choice():
    r = E.score_mc([E.MCItem("Q:", ["a", "b", "c"], 0)], [-1.0, -1.0, -1.0])
    assert r["acc"] == 1.0 and r["acc_norm"] == 1.0


def test_evaluate_mc_with_known_loglikelihoods(monkeypatch):
    """evaluate_mc asks for every (context, choice) pair once, in item order, and scores what it gets."""
    table = {("Q: 1+1\nAnswer:", " 2"): -0.5, ("Q: 1+1\nAnswer:", " 3"): -2.0, ("Q: 1+1\nAnswer:", " eleven"): -1.0}
    asked = []

    def fake(model, tok, pairs, batch_size=16):
        asked.extend(pairs)
        return [(table[p], False) for p in pairs]
    monkeypatch.setattr(E, "loglikelihood", fake)
    item = E.MCItem("Q: 1+1\nAnswer:", ["2", "3", "eleven"], gold=0)
    r = E.evaluate_mc(None, None, [item])
    assert asked == [(item.context, " 2"), (item.context, " 3"), (item.context, " eleven")]
    assert r["acc"] == 1.0                      # -0.5 is the largest
    assert r["acc_norm"] == 0.0                 # per character: -0.5, -2.0, -0.1667 -> "eleven"


def test_subset_first_n_and_seeded_sample():
    xs = list(range(100))
    assert E.subset(xs, 5) == [0, 1, 2, 3, 4]
    assert E.subset(xs, None) == xs and E.subset(xs, 1000) == xs
    a, b = E.subset(xs, 10, seed=1), E.subset(xs, 10, seed=1)
    assert a == b and a == sorted(a) and len(set(a)) == 10 and a != xs[:10]
    with pytest.raises(E.UserError):
        E.subset(xs, 0)

# -----------------------------------------------------------------------------
# prompts


def test_mmlu_prompt_synthetic_subject():
    shots = [["What is 2+2?", "3", "4", "5", "6", "B"]]
    row = ["Pick C.", "a", "b", "c", "d", "C"]
    assert E.mmlu_prompt("toy_math", row) == (
        "The following are multiple choice questions (with answers) about toy math.\n\n"
        "Pick C.\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert E.mmlu_prompt("toy_math", row, shots) == (
        "The following are multiple choice questions (with answers) about toy math.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "Pick C.\nA. a\nB. b\nC. c\nD. d\nAnswer:")


ALGEBRA_Q0 = ("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
              "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
HEAD = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"


def test_mmlu_prompt_real_subject_0_and_5_shot(shared_dir):
    items0 = E.mmlu_items(shared_dir / "data" / "mmlu", shots=0, subjects=["abstract_algebra"])
    assert len(items0) == 100
    assert items0[0].context == HEAD + ALGEBRA_Q0
    assert items0[0].continuations == [" A", " B", " C", " D"] and items0[0].gold == 1 and items0[0].subject == "abstract_algebra"
    items5 = E.mmlu_items(shared_dir / "data" / "mmlu", shots=5, subjects=["abstract_algebra"])
    assert items5[0].context == HEAD + (
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K "
        "are subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\n"
        "D. False, True\nAnswer: B\n\n"
        "Statement 1 | Every element of a group generates a cyclic subgroup of the group. Statement 2 | The "
        "symmetric group S_10 has 10 elements.\nA. True, True\nB. False, False\nC. True, False\n"
        "D. False, True\nAnswer: C\n\n"
        "Statement 1| Every function from a finite set onto itself must be one to one. Statement 2 | Every "
        "subgroup of an abelian group is abelian.\nA. True, True\nB. False, False\nC. True, False\n"
        "D. False, True\nAnswer: A\n\n"
        "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n" + ALGEBRA_Q0)


def test_mmlu_all_subjects_and_seeded_limit(shared_dir):
    d = shared_dir / "data"
    assert len(E.mmlu_subjects(d / "mmlu")) == 57
    a = E.task_items("mmlu", d, limit=50, seed=1234)
    b = E.task_items("mmlu", d, limit=50, seed=1234)
    assert [x.context for x in a] == [x.context for x in b] and len(a) == 50
    assert len({x.subject for x in a}) > 20         # a sample across subjects, not the first one's 50


def test_arc_first_item(shared_dir):
    it = E.arc_items(shared_dir / "data" / "arc_easy_dev.jsonl")
    assert len(it) == 570
    assert it[0].context == "Question: Which technology was developed most recently?\nAnswer:"
    assert it[0].choices == ["cellular telephone", "television", "refrigerator", "airplane"]
    assert it[0].gold == 0
    assert len(E.arc_items(shared_dir / "data" / "arc_challenge_dev.jsonl")) == 299


def test_hellaswag_first_item_and_preprocessing(shared_dir):
    it = E.hellaswag_items(shared_dir / "data" / "hellaswag_1000.jsonl")
    assert len(it) == 1000
    assert it[0].context == ("Pole vault: Pole vault is a sport where you run with a pole and stop and swing "
                             "your body. A few women")
    assert it[0].continuations[0] == " go down a rock and stop." and len(it[0].choices) == 4 and it[0].gold == 3
    assert E.hellaswag_preprocess(" How to cook [title] Boil water. [step] Add  salt ") == "How to cook. Boil water. Add salt"


def test_bad_task_file_is_a_user_error(tmp_path):
    p = tmp_path / "arc.jsonl"
    p.write_text('{"question": {"stem": "x"}}\n')
    with pytest.raises(E.UserError, match="line|item 1"):
        E.arc_items(p)
    with pytest.raises(E.UserError, match="not found"):
        E.arc_items(tmp_path / "missing.jsonl")
    with pytest.raises(E.UserError, match="unknown task"):
        E.task_items("nope", tmp_path)

# -----------------------------------------------------------------------------
# log-likelihoods on a model directory: conftest's tiny random LLaMA with its test-trained sentencepiece
# tokenizer (stories260K only where real ARC items are scored)


def _load(model_dir):
    from model import Transformer
    from tokenizer import load_tokenizer
    return Transformer.from_pretrained(model_dir), load_tokenizer(model_dir)


@pytest.fixture
def tiny_lm(tiny_model_dir):
    return _load(tiny_model_dir)


@pytest.fixture
def stories(stories_dir):
    return _load(stories_dir)


def naive_ll(model, ctx, cont):
    """sum_t log p(cont[t] | ctx + cont[:t]), one full forward per token."""
    total = 0.0
    for t in range(len(cont)):
        logits = model(torch.tensor([ctx + cont[:t]]))[0, -1].double()
        total += torch.log_softmax(logits, -1)[cont[t]].item()
    return total


def test_loglikelihood_equals_naive_per_token(tiny_lm):
    model, tok = tiny_lm
    pairs = [("Once upon a time, there was a little girl", " named Lily."),
             ("Once upon a time, there was a little girl", " who liked cats and dogs."),
             ("The sun was hot", "."),
             ("Tom had a red ball", " and a big blue box")]
    reqs = [E.encode_pair(tok, c, x) for c, x in pairs]
    want = [naive_ll(model, ctx, cont) for ctx, cont in reqs]
    for impl in E.LL_IMPLS:
        for batch_size in (1, 3, 16):  # padding, batching and shared contexts must not change anything
            got = E.loglikelihood_tokens(model, reqs, batch_size=batch_size, impl=impl)
            for w, (ll, greedy) in zip(want, got):
                assert ll == pytest.approx(w, abs=1e-4), (impl, batch_size)
                assert isinstance(greedy, bool)


def _shared_matches_rows(model, tok, items):
    reqs = [E.encode_pair(tok, it.context, c) for it in items for c in it.continuations]
    assert any(len(cont) > 1 for _, cont in reqs)  # the shared-context path has multi-token choices to run
    rows = E.loglikelihood_tokens(model, reqs, impl="rows")
    shared = E.loglikelihood_tokens(model, reqs, batch_size=6, impl="shared")
    assert len(rows) == len(shared) == len(reqs)
    for (a, ga), (b, gb) in zip(rows, shared):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_shared_context_path_matches_rows_on_arc_items(tiny_lm, tiny_data):
    """ARC-format items (one context, three or four multi-token choices, ragged lengths) through both paths."""
    model, tok = tiny_lm
    _shared_matches_rows(model, tok, E.arc_items(tiny_data / "arc_easy_dev.jsonl"))


def test_shared_context_path_matches_rows_on_real_items(stories, shared_dir):
    """The same on the first five real ARC-Easy items with stories260K."""
    model, tok = stories
    _shared_matches_rows(model, tok, E.arc_items(shared_dir / "data" / "arc_easy_dev.jsonl")[:5])


def test_single_token_choices_share_one_row(tiny_lm):
    model, tok = tiny_lm
    ctx = tok.encode("Lily saw a big")
    conts = [[tok.encode(w, bos=False)[-1]] for w in (" dog", " cat", " tree")]
    got = E.loglikelihood_tokens(model, [(ctx, c) for c in conts])
    logp = torch.log_softmax(model(torch.tensor([ctx]))[0, -1].double(), -1)
    for c, (ll, greedy) in zip(conts, got):
        assert ll == pytest.approx(logp[c[0]].item(), abs=1e-5)
        assert greedy == (int(logp.argmax()) == c[0])


def test_greedy_flag_on_the_models_own_continuation(tiny_lm):
    from generate import generate
    model, tok = tiny_lm
    ctx = tok.encode("Once upon a time")
    cont = generate(model, ctx, 8)
    (ll, greedy), = E.loglikelihood_tokens(model, [(ctx, cont)])
    assert greedy and ll < 0


def test_long_context_is_cut_on_the_left(tiny_lm):
    model, _ = tiny_lm
    L = model.args.max_seq_len
    ctx = torch.randint(3, 500, (L + 40,)).tolist()
    cont = [5, 6, 7]
    (ll, _), = E.loglikelihood_tokens(model, [(ctx, cont)])
    kept = (ctx + cont)[-(L + 1):]
    assert ll == pytest.approx(naive_ll(model, kept[:-3], cont), abs=1e-4)


def test_encode_pair_moves_trailing_space_to_the_continuation(tiny_lm):
    _, tok = tiny_lm
    ctx, cont = E.encode_pair(tok, "The cat sat ", "down")
    assert ctx == tok.encode("The cat sat")
    assert ctx + cont == tok.encode("The cat sat down")


def test_response_loss_matches_trainer_definition(tiny_lm):
    import data
    model, tok = tiny_lm
    recs = [{"instruction": "Say hi.", "input": "", "output": "hi there"},
            {"instruction": "Count.", "input": "a b", "output": "two"}]
    exs, _ = data.build_examples(recs, tok)
    total, n = 0.0, 0
    for ex in exs:
        total += naive_ll(model, ex.ids[:ex.n_prompt], ex.ids[ex.n_prompt:])
        n += len(ex.ids) - ex.n_prompt
    assert E.response_loss(model, exs) == pytest.approx(-total / n, abs=1e-5)


def test_synthetic_eval_runs(tiny_lm):
    model, tok = tiny_lm
    r = E.synthetic_eval(model, tok, n_train=40, n_heldout=8, max_new_tokens=4, limit=5)
    assert r["n"] == 5 and 0.0 <= r["exact_match"] <= 1.0 and math.isfinite(r["loss"]) and r["loss"] > 0
    assert r["exact_match_stderr"] == pytest.approx(E.stderr(r["exact_match"], 5))
    json.dumps(r)


def test_evaluate_tasks_json(tiny_lm, tiny_data):
    """Task files in the real formats (conftest's tiny_data: ARC jsonl, HellaSwag jsonl, MMLU csv folders)."""
    model, tok = tiny_lm
    r = E.evaluate_tasks(model, tok, ["arc_easy", "hellaswag", "mmlu"], data_dir=tiny_data, limit=3)
    assert r["arc_easy"]["n"] == 3 and r["hellaswag"]["n"] == 3 and r["mmlu"]["n"] == 3
    assert "acc_norm" not in r["mmlu"] and "acc_norm" in r["hellaswag"]
    assert sum(s["n"] for s in r["mmlu"]["subjects"].values()) == 3
    json.dumps(r)

# -----------------------------------------------------------------------------
# the CLI


def _run(*argv):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "eval.py", *argv], capture_output=True, text=True,
                          cwd=E.Path(E.__file__).parent)


def test_cli_bad_input_is_one_line():
    for argv in (["--tasks", "nope"], ["--tasks", "arc_easy", "--limit", "0"], []):
        r = _run("--model", "/nonexistent", *argv)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _cli_tasks_json(tmp_path, *argv):
    out = tmp_path / "r.json"
    r = _run(*argv, "--tasks", "arc_easy,mmlu", "--limit", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    assert [l["task"] for l in lines] == ["arc_easy", "mmlu"] and all(l["n"] == 2 for l in lines)
    saved = json.loads(out.read_text())["results"]
    assert saved["arc_easy"]["acc"] == lines[0]["acc"] and "subjects" in saved["mmlu"]


def test_cli_tasks_json(tiny_model_dir, tiny_data, tmp_path):
    _cli_tasks_json(tmp_path, "--model", str(tiny_model_dir), "--data-dir", str(tiny_data))


def test_cli_tasks_json_default_data_dir(stories_dir, shared_dir, tmp_path):
    """Without --data-dir, eval.py reads the real task files in ../shared/data."""
    _cli_tasks_json(tmp_path, "--model", str(stories_dir))

# -----------------------------------------------------------------------------
# replicate.py: flags, and the whole grid on stories260K (slow)


def test_replicate_flags():
    import replicate
    q = replicate.get_args(["--quick"])
    f = replicate.get_args([])
    assert q.steps < f.steps and q.limit_mmlu < f.limit_mmlu and q.bits == [4, 3, 2]
    assert replicate.get_args(["--quick", "--steps", "7"]).steps == 7
    with pytest.raises(E.UserError, match="bits"):
        replicate.get_args(["--bits", "4,5"])


@pytest.mark.slow
def test_replicate_grid_end_to_end_and_deterministic(stories_dir, tmp_path):
    import replicate
    argv = ["--model", str(stories_dir), "--bits", "4,2", "--steps", "3", "--batch-size", "4", "--seq-len", "512",
            "--n-train", "40", "--n-heldout", "8", "--alpaca-heldout", "10", "--calib-windows", "4",
            "--calib-len", "64", "--limit-arc", "4", "--limit-hellaswag", "4", "--limit-mmlu", "4", "--threads", "1"]
    replicate.main(argv + ["--out", str(tmp_path / "a")])
    replicate.main(argv + ["--out", str(tmp_path / "b")])
    a, b = (json.loads((tmp_path / d / "replicate.json").read_text()) for d in "ab")
    assert len(a["rows"]) == 1 + 2 * 4 and len(a["table2"]) == 4

    def results(x):  # everything but wall-clock times
        if isinstance(x, dict):
            return {k: results(v) for k, v in x.items() if k not in ("seconds", "wall_seconds", "s_per_step",
                                                                      "train_seconds", "peak_rss_mb")}
        return [results(v) for v in x] if isinstance(x, list) else x
    assert results(a["rows"]) == results(b["rows"])
    qa = [t for t in a["table2"] if t["method"] == "QA-LoRA"]
    assert all(t["merged_synth_loss"] == pytest.approx(t["unmerged_synth_loss"], rel=1e-4) for t in qa)
    assert "| model |" in (tmp_path / "a" / "replicate.md").read_text()
