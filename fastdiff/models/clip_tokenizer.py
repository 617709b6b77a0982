"""The CLIP byte-pair-encoding tokenizer (SD1's text encoder; SD3's CLIP-L and CLIP-G), on the ``tokenizers`` library.

The vocabulary ships with fastdiff as OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (fastdiff/assets/clip, MIT, see
LICENSE-CLIP). That file holds only the merge list; the token -> id table is derived from it exactly as CLIP's own
``SimpleTokenizer`` does (and as the ``vocab.json`` / ``merges.txt`` on the hub were made):

    ids 0..255        the 256 byte symbols of GPT-2's byte-to-unicode map, in that map's order
    ids 256..511      the same symbols with the end-of-word marker ``</w>``
    ids 512..49405    one token per merge (the two halves concatenated), in merge order (48,894 merges)
    ids 49406, 49407  ``<|startoftext|>``, ``<|endoftext|>``

The BPE itself, the normalisation (NFC, whitespace runs -> one space, lower case) and CLIP's word-splitting
regex are the ``tokenizers`` library's, configured the way transformers configures its CLIP tokenizer, so ids
match transformers' ``CLIPTokenizer`` (tests/test_sd1_models.py checks a list of prompts).

Usage::

    tok = CLIPTokenizer.from_bundled()          # SD1 / SD3 CLIP-L: pads with <|endoftext|>
    tok = CLIPTokenizer.from_bundled(pad_token="!")   # SD3 CLIP-G: pads with "!" (id 0)
    ids = tok(["a photo of a cat"])              # LongTensor (1, 77): bos, tokens, eos, padding
"""
from __future__ import annotations

import gzip
import json
import os
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["CLIPTokenizer", "bytes_to_unicode", "read_clip_bpe", "BOS_TOKEN", "EOS_TOKEN"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file (vocab size 49,408)
# CLIP's word splitter (contractions, letter runs, single digits, punctuation runs), as transformers writes it,
# with the two special tokens first so a literal "<|endoftext|>" in a prompt stays one piece.
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable bytes map to themselves; the other 68 go to U+0100 onwards, in byte order. The dict's insertion
    order (printable bytes first) is the order of the first 256 CLIP token ids.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bundled_bpe_path() -> Path:
    return Path(str(resources.files("fastdiff") / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"))


def read_clip_bpe(path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Derive ``(vocab, merges)`` from CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (the bundled one by default)."""
    path = Path(path) if path is not None else _bundled_bpe_path()
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found: {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is a version header; CLIP uses the next 48,894 merges
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not CLIP's BPE merge list (expected {_N_MERGES} 'a b' lines after the header)")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: derived vocabulary has duplicate tokens")
    return vocab, merges  # type: ignore[return-value]


class CLIPTokenizer:
    """CLIP BPE tokenizer returning fixed-length id tensors the way SD pipelines use them.

    ``pad_token`` is ``<|endoftext|>`` for SD1 and SD3's CLIP-L, ``"!"`` for SD3's CLIP-G.
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, pad_token: str = EOS_TOKEN,
                 model_max_length: int = 77):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        for tok in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if tok not in vocab:
                raise ValueError(f"CLIPTokenizer: token {tok!r} is not in the vocabulary")
        if model_max_length < 2:
            raise ValueError(f"CLIPTokenizer: model_max_length must be >= 2, got {model_max_length}")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.pad_token = pad_token
        self.model_max_length = int(model_max_length)
        self.bos_token_id = vocab[BOS_TOKEN]
        self.eos_token_id = vocab[EOS_TOKEN]
        self.pad_token_id = vocab[pad_token]

        tk = Tokenizer(BPE(vocab=self.vocab, merges=self.merges, dropout=None, continuing_subword_prefix="",
                           end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS_TOKEN))
        tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                              normalizers.Lowercase()])
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tk.decoder = decoders.ByteLevel()
        # bos + tokens + eos (RobertaProcessing is the single-sequence template with byte-level offsets)
        tk.post_processor = processors.RobertaProcessing((EOS_TOKEN, self.eos_token_id),
                                                         (BOS_TOKEN, self.bos_token_id), False, False)
        # The pad token is a special token too, as in transformers: with SD3's pad "!", a "!" in the text is
        # then split off as its own token (id 0) instead of merging into "!!" etc. Matching that keeps SD3's
        # CLIP-G ids equal to what diffusers feeds its text encoder.
        tk.add_special_tokens(list(dict.fromkeys([BOS_TOKEN, EOS_TOKEN, pad_token])))
        self._tk = tk

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_bundled(cls, *, pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> "CLIPTokenizer":
        """The vocabulary shipped with fastdiff."""
        vocab, merges = read_clip_bpe()
        return cls(vocab, merges, pad_token=pad_token, model_max_length=model_max_length)

    @classmethod
    def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike, *,
                   pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> "CLIPTokenizer":
        """The hub layout: ``vocab.json`` (token -> id) and ``merges.txt`` (``#version`` header, ``a b`` lines)."""
        with open(vocab_json, encoding="utf-8") as f:
            vocab = json.load(f)
        if not isinstance(vocab, dict):
            raise ValueError(f"{vocab_json}: expected a JSON object token -> id")
        merges = []
        with open(merges_txt, encoding="utf-8") as f:
            for i, line in enumerate(f.read().split("\n")):
                if (i == 0 and line.startswith("#version")) or not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{merges_txt}:{i + 1}: expected 'a b', got {line!r}")
                merges.append((parts[0], parts[1]))
        return cls(vocab, merges, pad_token=pad_token, model_max_length=model_max_length)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "CLIPTokenizer":
        """A diffusers/transformers ``tokenizer/`` folder (vocab.json, merges.txt, optional tokenizer_config.json)."""
        folder = Path(folder)
        cfg: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                with open(folder / name, encoding="utf-8") as f:
                    cfg = {**json.load(f), **cfg}
        pad = cfg.get("pad_token", EOS_TOKEN)
        if isinstance(pad, dict):  # transformers' AddedToken serialisation
            pad = pad.get("content", EOS_TOKEN)
        max_len = cfg.get("model_max_length", 77)
        if not isinstance(max_len, int) or max_len > 10_000:  # transformers writes a huge int for "no limit"
            max_len = 77
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return cls.from_files(folder / "vocab.json", folder / "merges.txt", pad_token=pad, model_max_length=max_len)
        if (folder / "tokenizer.json").is_file():  # what transformers >= 5 writes: vocab and merges inside
            with open(folder / "tokenizer.json", encoding="utf-8") as f:
                model = json.load(f).get("model", {})
            if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
                raise ValueError(f"{folder / 'tokenizer.json'}: not a BPE tokenizer")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
            if any(len(m) != 2 for m in merges):
                raise ValueError(f"{folder / 'tokenizer.json'}: malformed merges")
            return cls(model["vocab"], merges, pad_token=pad, model_max_length=max_len)
        raise FileNotFoundError(f"{folder}: no vocab.json + merges.txt or tokenizer.json (a CLIP tokenizer folder)")

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt and tokenizer_config.json (readable by transformers' CLIPTokenizer)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(folder / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.write("".join(f"{a} {b}\n" for a, b in self.merges))
        with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length,
                       "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                       "pad_token": self.pad_token, "do_lower_case": True}, f, indent=2)

    # ------------------------------------------------------------------------------------------- tokenizing
    def encode(self, text: str) -> list[int]:
        """All ids of ``text`` with bos/eos, neither truncated nor padded."""
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer.encode: expected str, got {type(text).__name__}")
        return self._tk.encode(text).ids

    def __call__(self, texts: str | Iterable[str], *, max_length: int | None = None, truncation: bool = True,
                 padding: bool = True) -> torch.Tensor:
        """Ids as a LongTensor (batch, max_length): bos, tokens, eos, then pad ids.

        With ``truncation`` the text is cut so bos + tokens + eos fit ``max_length`` (default 77), as
        diffusers' pipelines do; without it an over-long text raises.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("CLIPTokenizer: expected a string or a non-empty list of strings")
        n = self.model_max_length if max_length is None else int(max_length)
        rows = []
        for enc in self._tk.encode_batch(texts):
            ids = enc.ids
            if len(ids) > n:
                if not truncation:
                    raise ValueError(f"CLIPTokenizer: text of {len(ids)} tokens exceeds max_length={n}")
                ids = ids[: n - 1] + [self.eos_token_id]
            if padding:
                ids = ids + [self.pad_token_id] * (n - len(ids))
            rows.append(ids)
        if not padding and len({len(r) for r in rows}) > 1:
            raise ValueError("CLIPTokenizer: texts of different lengths need padding=True")
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab={len(self.vocab)}, pad={self.pad_token!r}, max_length={self.model_max_length})"
