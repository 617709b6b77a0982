"""The T5 SentencePiece (unigram) tokenizer: Stable Diffusion 3's third tokenizer, on the ``tokenizers`` library.

The vocabulary ships with fastdiff as the standard T5 ``tokenizer.json`` (fastdiff/assets/t5, Apache-2.0, see
LICENSE-T5): 32,000 unigram pieces plus the 100 ``<extra_id_*>`` sentinels, ids ``<pad>`` 0, ``</s>`` 1,
``<unk>`` 2. That file carries the whole pipeline (SentencePiece's precompiled NFKC-style normaliser, the
``▁`` metaspace pre-tokenizer, the unigram model and the ``$A </s>`` template), so the ``tokenizers`` library
runs it as written and the ids equal transformers' ``T5TokenizerFast`` on the same file (tests/test_t5.py).

T5 has no bos token; every sequence ends in ``</s>``. SD3 pipelines pad with ``<pad>`` (0) to
``max_sequence_length`` (256 by default, 77 in some UIs) and truncate keeping ``</s>`` last, as transformers'
``truncation=True`` does.

Usage::

    tok = T5Tokenizer.from_bundled()
    tok.encode("a photo of a cat")          # [3, 9, 1202, 13, 3, 9, 1712, 1]
    ids = tok(["a photo of a cat"])          # LongTensor (1, 256): tokens, </s>, then 0s
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["T5Tokenizer", "PAD_TOKEN", "EOS_TOKEN", "UNK_TOKEN"]

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
_EXTRA_IDS = 100


def _bundled_path() -> Path:
    return Path(str(resources.files("fastdiff") / "assets" / "t5" / "tokenizer.json"))


class T5Tokenizer:
    """T5 unigram tokenizer returning fixed-length id tensors the way SD3 pipelines use them."""

    def __init__(self, tokenizer_json: str, *, model_max_length: int = 256):
        """``tokenizer_json``: the text of a ``tokenizers`` tokenizer.json holding a T5 unigram model."""
        from tokenizers import Tokenizer

        if model_max_length < 1:
            raise ValueError(f"T5Tokenizer: model_max_length must be >= 1, got {model_max_length}")
        try:
            spec = json.loads(tokenizer_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"T5Tokenizer: tokenizer.json is not valid JSON: {e}") from None
        if not isinstance(spec, dict) or spec.get("model", {}).get("type") != "Unigram":
            raise ValueError("T5Tokenizer: tokenizer.json does not hold a Unigram (SentencePiece) model")
        tk = Tokenizer.from_str(tokenizer_json)
        ids = {t: tk.token_to_id(t) for t in (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"T5Tokenizer: tokens {missing} are not in the vocabulary")
        # The file's template appends </s>; without it encode() would silently drop the eos T5 was trained with.
        if tk.encode("").ids != [ids[EOS_TOKEN]]:
            raise ValueError("T5Tokenizer: tokenizer.json does not append </s> to a sequence (no T5 post-processor)")
        tk.no_truncation()
        tk.no_padding()
        self._json = tokenizer_json
        self._tk = tk
        self.model_max_length = int(model_max_length)
        self.pad_token_id = ids[PAD_TOKEN]
        self.eos_token_id = ids[EOS_TOKEN]
        self.unk_token_id = ids[UNK_TOKEN]

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: str | os.PathLike, *, model_max_length: int = 256) -> "T5Tokenizer":
        """A ``tokenizer.json`` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"T5 tokenizer.json not found: {path}")
        return cls(path.read_text(encoding="utf-8"), model_max_length=model_max_length)

    @classmethod
    def from_bundled(cls, *, model_max_length: int = 256) -> "T5Tokenizer":
        """The vocabulary shipped with fastdiff."""
        return cls.from_file(_bundled_path(), model_max_length=model_max_length)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, model_max_length: int | None = None) -> "T5Tokenizer":
        """A transformers / diffusers ``tokenizer_3/`` folder holding ``tokenizer.json``.

        ``model_max_length`` defaults to the folder's tokenizer_config.json value when that is a real limit
        (SD3's is 256 or 512), else 256.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"not a directory: {folder}")
        if not (folder / "tokenizer.json").is_file():
            if (folder / "spiece.model").is_file():
                raise FileNotFoundError(
                    f"{folder} has only spiece.model (a SentencePiece protobuf); fastdiff reads the tokenizers "
                    f"form: provide a tokenizer.json beside it (transformers writes one with "
                    f"T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)), or use "
                    f"T5Tokenizer.from_bundled(), which is the same standard T5 vocabulary")
            raise FileNotFoundError(f"{folder}: no tokenizer.json (a T5 tokenizer folder)")
        if model_max_length is None:
            model_max_length = 256
            cfg_path = folder / "tokenizer_config.json"
            if cfg_path.is_file():
                with open(cfg_path, encoding="utf-8") as f:
                    n = json.load(f).get("model_max_length")
                if isinstance(n, int) and 0 < n <= 100_000:  # transformers writes a huge int for "no limit"
                    model_max_length = n
        return cls.from_file(folder / "tokenizer.json", model_max_length=model_max_length)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json (the vocabulary unchanged) and a tokenizer_config.json transformers'
        ``T5TokenizerFast.from_pretrained`` reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(self._json, encoding="utf-8")
        extra = [f"<extra_id_{i}>" for i in range(_EXTRA_IDS)]
        cfg = {"tokenizer_class": "T5Tokenizer", "model_max_length": self.model_max_length, "eos_token": EOS_TOKEN,
               "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN, "extra_ids": _EXTRA_IDS,
               "additional_special_tokens": extra}
        with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)

    # ------------------------------------------------------------------------------------------- tokenizing
    def encode(self, text: str) -> list[int]:
        """All ids of ``text`` ending in ``</s>``, neither truncated nor padded."""
        if not isinstance(text, str):
            raise TypeError(f"T5Tokenizer.encode: expected str, got {type(text).__name__}")
        return self._tk.encode(text).ids

    def __call__(self, texts: str | Iterable[str], max_length: int | None = None, truncation: bool = True,
                 padding: bool = True) -> torch.Tensor:
        """Ids as a LongTensor (batch, max_length): tokens, ``</s>``, then ``<pad>`` (0).

        ``max_length`` defaults to ``model_max_length`` (256, SD3's ``max_sequence_length``). With
        ``truncation`` a longer text keeps its first ``max_length - 1`` tokens and then ``</s>`` (transformers'
        rule); without it an over-long text raises. ``padding=False`` returns the rows unpadded, which must
        then all have one length.
        """
        if isinstance(texts, str):
            texts = [texts]
        elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
            raise TypeError(f"T5Tokenizer: expected a string or a list of strings, got {type(texts).__name__}")
        texts = list(texts)
        if not texts:
            raise ValueError("T5Tokenizer: empty list of texts")
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"T5Tokenizer: every text must be a str, got {', '.join(sorted(set(bad)))}")
        n = self.model_max_length if max_length is None else max_length
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"T5Tokenizer: max_length must be a positive int, got {n!r}")
        rows = []
        for enc in self._tk.encode_batch(texts):
            ids = enc.ids
            if len(ids) > n:
                if not truncation:
                    raise ValueError(f"T5Tokenizer: text of {len(ids)} tokens exceeds max_length={n}")
                ids = ids[: n - 1] + [self.eos_token_id]
            if padding:
                ids = ids + [self.pad_token_id] * (n - len(ids))
            rows.append(ids)
        if not padding and len({len(r) for r in rows}) > 1:
            raise ValueError("T5Tokenizer: texts of different lengths need padding=True")
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"T5Tokenizer.decode: expected one row of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TypeError("T5Tokenizer.decode: ids must be ints")
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self._tk.get_vocab_size()

    def __repr__(self) -> str:
        return f"T5Tokenizer(vocab={len(self)}, max_length={self.model_max_length})"
