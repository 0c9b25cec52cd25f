"""Tokenizers behind one small interface: encode(text, bos=None) -> ids, decode(ids) -> text, bos_id, eos_id.

Two kinds:
- sentencepiece `tokenizer.model` (LLaMA-2, llama2.c's stories models): adds BOS by default;
- byte-level BPE, from an HF `tokenizer.json` or from the vocab, merges and pre-tokenizer named in a GGUF
  file (`tokenizer.ggml.*`), run with the `tokenizers` package. SmolLM2's GGUF names the pre-tokenizer
  "smollm": digits are split one by one, then GPT-2's byte-level regex; and it says add_bos_token = false.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from model import UserError


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
    def __init__(self, path: Path):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"cannot load sentencepiece model {path}: {e}") from None
        self.path = Path(path)
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.add_bos = True
        self.vocab_size = self.sp.get_piece_size()

    def _encode(self, text):
        return self.sp.encode(text)

    def _decode(self, ids):
        return self.sp.decode(ids)

    def token_id(self, piece):
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def save(self, out_dir):
        shutil.copyfile(self.path, Path(out_dir) / "tokenizer.model")


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


def _gguf_tokenizer(path: Path) -> Tokenizer:
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer as TK, decoders, models
    from model import gguf_field
    try:
        r = GGUFReader(str(path))
    except Exception as e:
        raise UserError(f"cannot read GGUF file {path}: {e}") from None
    kind = gguf_field(r, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"{path}: GGUF tokenizer {kind!r} is not supported here (byte-level BPE 'gpt2' only); "
                        f"pass a directory with tokenizer.model instead")
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
    cfg = {}
    if (d / "tokenizer_config.json").is_file():
        cfg = json.loads((d / "tokenizer_config.json").read_text())
    name = lambda t: t if isinstance(t, str) or t is None else t.get("content")  # noqa: E731
    bos = tk.token_to_id(name(cfg.get("bos_token"))) if name(cfg.get("bos_token")) else None
    eos = tk.token_to_id(name(cfg.get("eos_token"))) if name(cfg.get("eos_token")) else None
    if "add_bos_token" in cfg:
        add_bos = bool(cfg["add_bos_token"])
    else:  # follow the post-processor: does encoding with special tokens put BOS first?
        add_bos = bos is not None and tk.encode("a", add_special_tokens=True).ids[:1] == [bos]
    return BPETokenizer(tk, bos, eos, add_bos, cfg.get("chat_template"))


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer from a model directory (tokenizer.model or tokenizer.json) or a GGUF file."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".model":
            return SentencePieceTokenizer(path)
        if path.suffix == ".json":
            return _hf_json_tokenizer(path.parent)
        return _gguf_tokenizer(path)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model")
    if (path / "tokenizer.json").is_file():
        return _hf_json_tokenizer(path)
    raise UserError(f"no tokenizer found at {path} (expected tokenizer.model, tokenizer.json or a .gguf file)")
