"""GGUF "llama" (sentencepiece) vocabularies tokenize exactly like the tokenizer.model they were converted from.

The GGUFs are written here with llama.cpp's tokenizer keys from what the sentencepiece package reports about a
real tokenizer.model (pieces, scores, types, special ids, normalizer behaviour); the reference is that same
sentencepiece model run by sentencepiece.
"""
import json

import pytest
import sentencepiece

from model import UserError
from tokenizer import load_tokenizer

# "tiny": conftest's sentencepiece BPE trained in the test session (always there); the real tokenizer.model
# files below ../shared when present
SP_MODELS = {"tiny": None, "stories260K": "models/stories260K/tokenizer.model",
             "llama2": "tokenizers/llama2/tokenizer.model"}

TEXTS = [
    "Hello world",
    "Once upon a time, there was a little girl named Lily.",
    " leading space",
    "   three leading spaces and  two   inner",
    "trailing spaces  ",
    "line one\nline two\n\n\tindented\r\nwindows line",
    "digits 0123456789 and 3.14159, 1,000,000",
    "accents: café, naïve, Ångström, jalapeño",
    "CJK 日本語の文章 and 中文 and 한국어",
    "emoji 🙂🚀 and a rare symbol ∮ ⧫",
    "<s> and </s> as plain text",
    "",
]


def sp_path(request, name):
    """The tokenizer.model called `name` in SP_MODELS (the real ones skip when ../shared is absent)."""
    if SP_MODELS[name] is None:
        return request.getfixturevalue("tiny_sp_path")
    path = request.getfixturevalue("shared_dir") / SP_MODELS[name]
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(params=list(SP_MODELS))
def sp_model(request):
    return sentencepiece.SentencePieceProcessor(model_file=str(sp_path(request, request.param)))


@pytest.fixture
def texts():
    """TEXTS plus paragraphs: the start of conftest's corpus, with CRLF line ends and as it is, and, when
    ../shared is there, a real TinyStories story (CRLF kept) and the start of Tiny Shakespeare."""
    from conftest import SHARED, TINY_TEXT
    out = list(TEXTS) + [TINY_TEXT[:1200], TINY_TEXT[:600].replace("\n", "\r\n")]
    for name, n in (("tinystories_valid_sample.txt", 1200), ("tinyshakespeare.txt", 800)):
        path = SHARED / "data" / name
        if path.is_file():
            with open(path, encoding="utf-8", newline="") as f:
                out.append(f.read(n))
    return out


def _token_type(sp, i):
    """llama.cpp's token type numbers: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte."""
    return (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
            else 5 if sp.is_unused(i) else 1)


def write_gguf(path, sp, model="llama", add_space_prefix=None, **extra):
    """A GGUF holding only tokenizer metadata, as llama.cpp's converter writes it for `sp`."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    n = sp.vocab_size()
    w.add_tokenizer_model(model)
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([_token_type(sp, i) for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    # the normalizer flags, as the keys llama.cpp defines for them; sentencepiece's API does not expose them,
    # its behaviour does (stories260K removes extra whitespace, LLaMA-2 does not)
    if add_space_prefix is None:
        add_space_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
    w.add_add_space_prefix(add_space_prefix)
    w.add_remove_extra_whitespaces(sp.decode(sp.encode("a  b")) == "a b")
    for key, value in extra.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_same_as(tok, sp, texts):
    for text in texts:
        ids = sp.encode(text)
        assert tok.encode(text, bos=False) == ids, text
        assert tok.decode(ids) == sp.decode(ids), text
        assert tok.decode(tok.encode(text)) == sp.decode(ids), text  # BOS decodes to nothing


def test_gguf_llama_vocab_tokenizes_like_sentencepiece(sp_model, texts, tmp_path):
    sp = sp_model
    tok = load_tokenizer(write_gguf(tmp_path / "tok.gguf", sp))
    assert_same_as(tok, sp, texts)
    assert tok.encode("Hello world") == [sp.bos_id()] + sp.encode("Hello world")  # BOS by default
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.vocab_size())
    assert tok.token_id("</s>") == sp.eos_id() and tok.token_id("no such piece") is None
    # characters outside the vocab go through byte fallback, as in the original
    assert any(sp.is_byte(i) for i in tok.encode("🚀", bos=False))


def test_gguf_llama_vocab_save_round_trips(sp_model, texts, tmp_path):
    sp = sp_model
    tok = load_tokenizer(write_gguf(tmp_path / "tok.gguf", sp))
    out = tmp_path / "out"
    out.mkdir()
    tok.save(out)
    back = load_tokenizer(out)
    assert_same_as(back, sp, texts)
    assert (back.bos_id, back.eos_id, back.add_bos) == (tok.bos_id, tok.eos_id, True)
    assert load_tokenizer(out / "tokenizer.model").encode("Hi there") == tok.encode("Hi there")


def test_gguf_llama_vocab_flags(sp_model, tmp_path):
    """add_bos_token and the chat template come from the file and survive save(); BOS can still be forced;
    a padding id shared with EOS (as in TinyLlama's GGUFs) changes nothing."""
    sp = sp_model
    tok = load_tokenizer(write_gguf(tmp_path / "tok.gguf", sp, add_bos_token=False, chat_template="[INST] x",
                                    pad_token_id=sp.eos_id()))
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    assert tok.encode("Hello") == sp.encode("Hello")
    assert tok.encode("Hello", bos=True) == [sp.bos_id()] + sp.encode("Hello")
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert (back.add_bos, back.chat_template) == (False, "[INST] x")
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["add_bos_token"] is False


def test_gguf_llama_vocab_without_space_prefix(shared_dir, tmp_path):
    """add_space_prefix = false: no U+2581 is put before the text (the piece 'Hello', not '▁Hello')."""
    path = shared_dir / SP_MODELS["llama2"]
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tok = load_tokenizer(write_gguf(tmp_path / "tok.gguf", sp, add_space_prefix=False))
    assert tok.encode("Hello world", bos=False) == [sp.piece_to_id("Hello"), sp.piece_to_id("\u2581world")]
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


def test_gguf_unknown_tokenizer_model_is_one_user_error(sp_model, tmp_path):
    path = write_gguf(tmp_path / "t5.gguf", sp_model, model="t5")
    with pytest.raises(UserError, match="'t5' is not supported") as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)


def test_gguf_without_tokenizer_is_one_user_error(tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(UserError, match="not supported"):
        load_tokenizer(tmp_path / "bare.gguf")


@pytest.mark.parametrize("name", ["tiny", "stories260K"])
def test_gguf_exported_by_merge_loads_the_source_tokenizer(request, name, tiny_args, texts, tmp_path):
    """export.export_gguf writes the source's tokenizer.model with the gguf package's own converter plus the
    normalizer flags (both tokenizers remove extra whitespace); reading that GGUF back gives the source's
    tokenization, leading, trailing and repeated spaces included. stories260K: also its golden prompt ids."""
    from conftest import quantized_model
    from export import export_gguf
    path = sp_path(request, name)  # the tokenizer.model of a model directory: conftest's tiny one, stories260K
    source = request.getfixturevalue("tiny_model_dir") if name == "tiny" else path.parent
    assert (source / "tokenizer.model").read_bytes() == path.read_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    model = quantized_model(tiny_args, 4, 32, vocab_size=sp.vocab_size())
    model.source = str(source)
    tok = load_tokenizer(export_gguf(model, tmp_path / "m.gguf"))
    assert any(t != t.strip(" ") or "  " in t for t in texts)
    assert_same_as(tok, sp, texts)
    if name == "stories260K":
        assert tok.encode("Once upon a time") == json.loads((source / "greedy.json").read_text())["prompt_ids"]


def test_corrupt_tokenizer_config_is_one_error(tmp_path, tiny_sp_path):
    import shutil
    shutil.copyfile(tiny_sp_path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)
