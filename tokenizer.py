"""Tokenizers behind one small interface: encode(text, bos=None) -> ids, decode(ids) -> text, bos_id, eos_id.

Two kinds:
- sentencepiece, from a `tokenizer.model` (LLaMA-2, llama2.c's stories models) or from the vocab, scores and
  token types of a GGUF file whose tokenizer.ggml.model is "llama" (llama.cpp's LLaMA-2, TinyLlama, Mistral):
  we rebuild the sentencepiece model those came from and let the sentencepiece package run it. Adds BOS by default;
- byte-level BPE, from an HF `tokenizer.json` or from the vocab, merges and pre-tokenizer named in a GGUF
  file (`tokenizer.ggml.*`), run with the `tokenizers` package. SmolLM2's GGUF names the pre-tokenizer
  "smollm": digits are split one by one, then GPT-2's byte-level regex; and it says add_bos_token = false.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from cli import UserError
from gguf_codec import gguf_field, gguf_reader


class Tokenizer:
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    vocab_size: int
    chat_template: str | None = None

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self._encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int | None:
        """The id of a whole token such as '<|im_end|>', or None."""
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model, from a tokenizer.model file or its serialized bytes (built from a GGUF vocab)."""

    def __init__(self, model: Path | bytes, add_bos: bool = True, chat_template: str | None = None):
        import sentencepiece as spm
        try:
            self.proto = model if isinstance(model, bytes) else Path(model).read_bytes()
            self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
        except (RuntimeError, OSError) as e:
            what = "the sentencepiece model built from the GGUF vocab" if isinstance(model, bytes) else model
            raise UserError(f"cannot load {what}: {e}") from None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.add_bos = add_bos
        self.vocab_size = self.sp.get_piece_size()
        self.chat_template = chat_template

    def _encode(self, text):
        return self.sp.encode(text)

    def _decode(self, ids):
        return self.sp.decode(ids)

    def token_id(self, piece):
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def save(self, out_dir):
        out_dir = Path(out_dir)
        (out_dir / "tokenizer.model").write_bytes(self.proto)
        # what the .model cannot say (a GGUF's add_bos_token, chat template), as HF's LLaMA directories say it
        tok_cfg = {"add_bos_token": self.add_bos}
        if self.chat_template:
            tok_cfg["chat_template"] = self.chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


class BPETokenizer(Tokenizer):
    """Byte-level BPE via the `tokenizers` package; special tokens are matched whole."""

    def __init__(self, tk, bos_id, eos_id, add_bos, chat_template=None):
        self.tk = tk
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template

    def _encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def _decode(self, ids):
        return self.tk.decode(ids, skip_special_tokens=False)

    def token_id(self, piece):
        return self.tk.token_to_id(piece)

    def save(self, out_dir):
        out_dir = Path(out_dir)
        self.tk.save(str(out_dir / "tokenizer.json"))
        tok_cfg = {"add_bos_token": self.add_bos,
                   "bos_token": self.tk.id_to_token(self.bos_id) if self.bos_id is not None else None,
                   "eos_token": self.tk.id_to_token(self.eos_id) if self.eos_id is not None else None}
        if self.chat_template:
            tok_cfg["chat_template"] = self.chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


# GGUF pre-tokenizer names (llama.cpp's `tokenizer.ggml.pre`) -> the `tokenizers` pipeline that matches them
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as pt
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm",):
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default", "gpt-2"):
        return byte_level
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pt.Sequence([pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2, llama-bpe)")


# --- a sentencepiece model from a GGUF "llama" vocab --------------------------------------------------------
# llama.cpp's "llama" (SPM) tokenizer is sentencepiece's BPE: merge the adjacent pair whose joined piece has the
# highest score, fall back to <0xXX> byte pieces. So we write the sentencepiece ModelProto the vocab came from
# and let sentencepiece run it: exact, and no protobuf dependency for these few fields of sentencepiece_model.proto.

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32s (pad_id = -1) are ten-byte two's complement varints
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _pb(field: int, value) -> bytes:
    """One protobuf field: str/bytes length-delimited, float as fixed32, int/bool as varint."""
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return _varint(field << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(field << 3 | 5) + struct.pack("<f", value)
    return _varint(field << 3) + _varint(int(value))


def _sentencepiece_proto(r) -> bytes:
    """ModelProto {pieces = 1, trainer_spec = 2, normalizer_spec = 3} from a GGUF reader's tokenizer.ggml.* keys."""
    g = lambda k, d=None: gguf_field(r, "tokenizer.ggml." + k, d)  # noqa: E731
    tokens = g("tokens")
    scores = g("scores") or [0.0] * len(tokens)
    # llama.cpp's token types use sentencepiece's numbers (1 normal .. 6 byte); 0 (undefined) counts as normal
    types = [t or 1 for t in g("token_type") or [1] * len(tokens)]
    # SentencePiece {piece = 1, score = 2, type = 3}
    pieces = b"".join(_pb(1, _pb(1, t) + _pb(2, float(sc)) + _pb(3, ty)) for t, sc, ty in zip(tokens, scores, types))
    # TrainerSpec: model_type = 3 (BPE = 2), vocab_size = 4, byte_fallback = 35; sentencepiece finds
    # bos/eos/unk/pad by piece name (bos_piece = 46 ...), so the names go beside the ids (bos_id = 41 ...)
    trainer = _pb(3, 2) + _pb(4, len(tokens)) + _pb(35, 6 in types)
    for id_field, piece_field, key in ((40, 45, "unknown_token_id"), (41, 46, "bos_token_id"),
                                       (42, 47, "eos_token_id"), (43, 48, "padding_token_id")):
        i = g(key)
        if i is not None and 0 <= i < len(tokens):
            trainer += _pb(id_field, i) + _pb(piece_field, tokens[i])
    # NormalizerSpec as in LLaMA's tokenizer.model: name = 1, add_dummy_prefix = 3, remove_extra_whitespaces = 4,
    # escape_whitespaces = 5 (spaces become U+2581); no precompiled charsmap, so no Unicode normalization.
    # remove_extra_whitespaces is honoured when the file records it (the source model's setting; stories260K's is true)
    normalizer = (_pb(1, "identity") + _pb(3, bool(g("add_space_prefix", True)))
                  + _pb(4, bool(g("remove_extra_whitespaces", False))) + _pb(5, True))
    return pieces + _pb(2, trainer) + _pb(3, normalizer)


def _gguf_tokenizer(path: Path) -> Tokenizer:
    r = gguf_reader(path)
    kind = gguf_field(r, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama") or not gguf_field(r, "tokenizer.ggml.tokens"):
        raise UserError(f"{path}: GGUF tokenizer {kind!r} is not supported here (byte-level BPE 'gpt2' and "
                        f"sentencepiece 'llama' only); pass a directory with tokenizer.model or tokenizer.json")
    if kind == "llama":  # LLaMA's sentencepiece adds BOS unless the file says otherwise
        add_bos = bool(gguf_field(r, "tokenizer.ggml.add_bos_token", True))
        return SentencePieceTokenizer(_sentencepiece_proto(r), add_bos, gguf_field(r, "tokenizer.chat_template"))
    return _gguf_bpe_tokenizer(r)


def _gguf_bpe_tokenizer(r) -> Tokenizer:
    from tokenizers import AddedToken, Tokenizer as TK, decoders, models
    tokens = gguf_field(r, "tokenizer.ggml.tokens")
    merges = gguf_field(r, "tokenizer.ggml.merges") or []
    types = gguf_field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tk = TK(bpe)
    tk.pre_tokenizer = _pre_tokenizer(gguf_field(r, "tokenizer.ggml.pre", "gpt2"))
    tk.decoder = decoders.ByteLevel()
    # control (3) and user-defined (4) tokens are matched whole, never split by BPE
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty in (3, 4)])
    return BPETokenizer(tk, gguf_field(r, "tokenizer.ggml.bos_token_id"),
                        gguf_field(r, "tokenizer.ggml.eos_token_id"),
                        bool(gguf_field(r, "tokenizer.ggml.add_bos_token", False)),
                        gguf_field(r, "tokenizer.chat_template"))


def _hf_json_tokenizer(d: Path) -> Tokenizer:
    from tokenizers import Tokenizer as TK
    try:
        tk = TK.from_file(str(d / "tokenizer.json"))
    except Exception as e:
        raise UserError(f"cannot load {d / 'tokenizer.json'}: {e}") from None
    cfg = _tokenizer_config(d)
    name = lambda t: t if isinstance(t, str) or t is None else t.get("content")  # noqa: E731
    bos = tk.token_to_id(name(cfg.get("bos_token"))) if name(cfg.get("bos_token")) else None
    eos = tk.token_to_id(name(cfg.get("eos_token"))) if name(cfg.get("eos_token")) else None
    if "add_bos_token" in cfg:
        add_bos = bool(cfg["add_bos_token"])
    else:  # follow the post-processor: does encoding with special tokens put BOS first?
        add_bos = bos is not None and tk.encode("a", add_special_tokens=True).ids[:1] == [bos]
    return BPETokenizer(tk, bos, eos, add_bos, cfg.get("chat_template"))


def _tokenizer_config(d: Path) -> dict:
    """d/tokenizer_config.json (HF: add_bos_token, bos/eos tokens, chat template), {} when absent."""
    f = d / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{f}: expected a JSON object")
    return cfg


def _sentencepiece_file(path: Path) -> Tokenizer:
    """A tokenizer.model, with add_bos_token and the chat template from a tokenizer_config.json beside it."""
    cfg = _tokenizer_config(path.parent)
    return SentencePieceTokenizer(path, bool(cfg.get("add_bos_token", True)), cfg.get("chat_template"))


def load_tokenizer(path, optional=False) -> Tokenizer | None:
    """A tokenizer from a model directory (tokenizer.model or tokenizer.json) or a GGUF file. optional=True:
    None for a model that has none (weights only, a GGUF without tokenizer.ggml.*); broken files still raise."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".model":
            return _sentencepiece_file(path)
        if path.suffix == ".json":
            return _hf_json_tokenizer(path.parent)
        if optional and gguf_field(gguf_reader(path), "tokenizer.ggml.model") is None:
            return None
        return _gguf_tokenizer(path)
    if (path / "tokenizer.model").is_file():
        return _sentencepiece_file(path / "tokenizer.model")
    if (path / "tokenizer.json").is_file():
        return _hf_json_tokenizer(path)
    if optional:
        return None
    raise UserError(f"no tokenizer found at {path} (expected tokenizer.model, tokenizer.json or a .gguf file)")
