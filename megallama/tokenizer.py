"""Tokenizers: SentencePiece models (LLaMA's, or one trained by tools/train_tokenizer.py), Hugging
Face tokenizer folders (LLaMA-3's byte-level BPE ``tokenizer.json``) and a null tokenizer for data
that is already ids.

Every tokenizer's ``encode`` gives the text's ids only, no BOS/EOS: preprocessing ends each document
with ``eod`` and generation/evaluation prepend ``bos_id`` themselves.

``encode_batch`` is the fast path preprocessing uses: SentencePiece never merges across a space,
so ids are memoised per whitespace chunk (in C++) and SentencePiece runs only on chunks not seen
before. It returns exactly SentencePiece's ids; models whose normalizer rewrites spaces fall back
to SentencePiece's own batch encode.
"""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import sentencepiece as spm

# Chunks of unseen text are encoded in one SentencePiece call, joined by a separator word: a space
# and a control character that only byte fallback can encode (so its byte id marks the cut).
_SEPARATOR = "\x01"
_SEPARATOR_WORD = " " + _SEPARATOR
_SPACES = (" ", "\u2581")
_KEYS_PER_TEXT = 32

# LLaMA's tokenizer settings (paper §2: BPE, numbers split into digits, byte fallback), and the
# ones Meta's tokenizer.model carries: no normalization, spaces kept as they are.
LLAMA_TRAINER_SETTINGS = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    character_coverage=0.99995,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


def _model_spec(processor: spm.SentencePieceProcessor):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    return proto


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file with bos/eos/pad ids and a fast exact batch encoder.

    ``pad_id`` is the model's pad id, or ``eos_id`` when the model defines none (LLaMA's has none).
    """

    def __init__(self, model_path: str, cache_entries: int = 1 << 22):
        if os.path.isdir(model_path):  # "does not exist" would mislead; FileNotFoundError as callers catch that
            raise FileNotFoundError(f"tokenizer model {model_path} is a folder, not a SentencePiece .model file "
                                    "(for a Hugging Face tokenizer folder use --tokenizer-type HuggingFaceTokenizer)")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model {model_path} does not exist")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self._cache_entries = cache_entries
        spec = _model_spec(self.sp)
        self.add_dummy_prefix = spec.normalizer_spec.add_dummy_prefix
        self.supports_chunk_cache = self._chunking_is_exact(spec)
        # ids of a lone space chunk (a single trailing space): what SentencePiece gives the word "▁"
        self._lone_space = self.sp.encode("a ")[len(self.sp.encode("a")):]
        self.barriers = self._barrier_characters(spec) if self.supports_chunk_cache else ""
        self._separator_ids = self._find_separator_ids(spec)
        self._cache = None
        if self.supports_chunk_cache:
            # loaded here, not on first use: preprocessing forks workers after construction
            import torch  # noqa: F401  (the extension links against torch's libraries)

            from megallama import _data

            self._cache = _data.ChunkCache(self.add_dummy_prefix, cache_entries, self.barriers)

    @staticmethod
    def _chunking_is_exact(spec) -> bool:
        norm, trainer = spec.normalizer_spec, spec.trainer_spec
        spaces_untouched = norm.name == "identity" and not norm.remove_extra_whitespaces and norm.escape_whitespaces
        words_split_at_spaces = trainer.split_by_whitespace and not trainer.treat_whitespace_as_suffix
        # a user-defined piece containing a space could match across a chunk boundary
        user_pieces_safe = all(" " not in p.piece and "\u2581" not in p.piece
                               for p in spec.pieces if p.type == p.USER_DEFINED)
        return bool(spaces_untouched and words_split_at_spaces and user_pieces_safe and trainer.model_type == trainer.BPE)

    @property
    def eod(self) -> int:
        return self.eos_id

    def encode(self, text: str) -> list[int]:
        """SentencePiece ids of ``text`` (no bos/eos)."""
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def _encode_keys(self, keys: list[str], num_threads: int | None) -> tuple[np.ndarray, np.ndarray]:
        """SentencePiece ids of each chunk key, back to back, and the count per key.

        A key is the chunk as SentencePiece sees it inside its text: it starts with a space (with
        a dummy prefix, the first chunk's key gets the space encode() adds in front), or with a
        barrier character when the chunk continues a word. Encoding keys one by one costs
        SentencePiece's per-call overhead each time, so keys are joined into one text with a
        separator word before each (words never merge) and the ids are cut at the separators.
        Keys that could merge with the separator (ending in a space, holding its character, or
        a first chunk without a space) go one by one.
        """
        starts_ok = _SPACES + tuple(self.barriers)
        alone = [i for i, k in enumerate(keys) if not k.startswith(starts_ok) or k[-1] in _SPACES or _SEPARATOR in k]
        if self._separator_ids is None:
            alone = list(range(len(keys)))
        lengths = np.zeros(len(keys), dtype=np.int64)
        is_alone = np.zeros(len(keys), dtype=bool)
        is_alone[alone] = True
        alone_ids = self._encode_one_by_one([keys[i] for i in alone], num_threads)
        lengths[alone] = [len(ids) for ids in alone_ids]
        joined_keys = [k for k, a in zip(keys, is_alone) if not a]
        joined_flat = np.zeros(0, dtype=np.int32)
        if joined_keys:
            # SentencePiece's BPE keeps one heap per text: a few dozen keys per text is fastest.
            groups = [_SEPARATOR_WORD + _SEPARATOR_WORD.join(joined_keys[i:i + _KEYS_PER_TEXT])
                      for i in range(0, len(joined_keys), _KEYS_PER_TEXT)]
            if self.add_dummy_prefix:
                groups = [g[1:] for g in groups]
            ids = np.fromiter(itertools.chain.from_iterable(self.sp.encode(groups, num_threads=num_threads)),
                              dtype=np.int32)
            sep = self._separator_ids
            ends = np.flatnonzero(ids == sep[-1])  # the separator's byte id: one before each key
            if len(ends) != len(joined_keys):
                raise RuntimeError(f"chunk separator found {len(ends)} times for {len(joined_keys)} chunks")
            key_starts = ends + 1
            key_ends = np.append(ends[1:] - (len(sep) - 1), ids.size)
            lengths[~is_alone] = key_ends - key_starts
            keep = np.ones(ids.size, dtype=bool)
            for k in range(len(sep)):
                keep[ends - k] = False
            joined_flat = ids[keep]
        flat = np.empty(int(lengths.sum()), dtype=np.int32)
        from_alone = np.repeat(is_alone, lengths)
        flat[~from_alone] = joined_flat
        if alone_ids:
            flat[from_alone] = np.fromiter((t for ids in alone_ids for t in ids), dtype=np.int32,
                                           count=int(from_alone.sum()))
        return flat, lengths

    def _encode_one_by_one(self, keys: list[str], num_threads: int | None) -> list[list[int]]:
        """Each key as its own SentencePiece text (one batched call)."""
        if not keys:
            return []
        if not self.add_dummy_prefix:
            return self.sp.encode(keys, num_threads=num_threads)
        # A key inside a word (starting with a barrier) is encoded after the dummy prefix's lone
        # space, whose ids are then dropped; any other key drops its first space, which the dummy
        # prefix puts back.
        inside = [k[0] in self.barriers for k in keys]
        texts = [k if i else k[1:] for k, i in zip(keys, inside)]
        out = []
        for key, text, is_inside, ids in zip(keys, texts, inside, self.sp.encode(texts, num_threads=num_threads)):
            if is_inside:
                if ids[:len(self._lone_space)] != self._lone_space:
                    raise RuntimeError(f"unexpected ids {ids} for chunk {key!r}")
                ids = ids[len(self._lone_space):]
            elif not text:
                ids = self._lone_space  # a lone space: SentencePiece gives an empty text no ids
            out.append(ids)
        return out

    @staticmethod
    def _barrier_characters(spec) -> str:
        """ASCII characters that no multi-character piece contains (in LLaMA's vocabulary: newline,
        the other control characters and, with split_digits, the digits): BPE can never merge
        across them. Byte pieces such as <0x0A> are not matched against text and do not count.
        Needs byte fallback."""
        if not spec.trainer_spec.byte_fallback:
            return ""  # without byte fallback, unknown characters on both sides of a cut merge into one unk
        mergeable = (spec.pieces[0].NORMAL, spec.pieces[0].USER_DEFINED)
        text = "".join(p.piece for p in spec.pieces if len(p.piece) > 1 and p.type in mergeable)
        return "".join(chr(c) for c in range(1, 128) if chr(c) != " " and chr(c) not in text)

    def _find_separator_ids(self, spec):
        """Ids of the separator word, if it ends in a byte id that nothing but the separator makes."""
        if any(_SEPARATOR in p.piece and len(p.piece) > 1 for p in spec.pieces):
            return None
        probe = self.sp.encode("a" + _SEPARATOR_WORD)
        base = self.sp.encode("a")
        sep = probe[len(base):]
        if probe[:len(base)] != base or not sep or self.sp.id_to_piece(sep[-1]) != "<0x01>":
            return None
        return sep

    def encode_batch(self, texts: list[str], append_eod: bool = False, num_threads: int | None = None):
        """Ids of every text as one flat int32 array and the per-text counts (int64).

        With ``append_eod`` each text's ids end with ``eos_id``. Identical to SentencePiece's ids.
        ``num_threads``: SentencePiece's threads (None: its default, every core; 1 in each of
        several worker processes, which share the cores already).
        """
        if not self.supports_chunk_cache:
            ids = self.sp.encode(list(texts), num_threads=num_threads)
            if append_eod:
                ids = [i + [self.eos_id] for i in ids]
            counts = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter((t for i in ids for t in i), dtype=np.int32, count=int(counts.sum()))
            return flat, counts
        misses = self._cache.scan(list(texts))
        if misses:
            key_ids, key_lengths = self._encode_keys(misses, num_threads)
        else:
            key_ids, key_lengths = np.zeros(0, np.int32), np.zeros(0, np.int64)
        return self._cache.finish(key_ids, key_lengths, self.eos_id if append_eod else -1)

    def __getstate__(self):  # for worker processes: reload the model, start an empty cache
        return {"model_path": self.model_path, "cache_entries": self._cache_entries}

    def __setstate__(self, state):
        self.__init__(state["model_path"], state["cache_entries"])


class NullTokenizer:
    """For text that already is ids: ``encode("5 17 3")`` → ``[5, 17, 3]``. The end-of-document id
    (also used as bos and pad) is ``vocab_size - 1``."""

    def __init__(self, vocab_size: int):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_id = self.eos_id = self.pad_id = vocab_size - 1

    @property
    def eod(self) -> int:
        return self.eos_id

    def encode(self, text: str) -> list[int]:
        ids = [int(t) for t in text.split()]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary of {self.vocab_size}")
        return ids

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def encode_batch(self, texts: list[str], append_eod: bool = False, num_threads: int | None = None):
        ids = [self.encode(t) + ([self.eos_id] if append_eod else []) for t in texts]
        counts = np.array([len(i) for i in ids], dtype=np.int64)
        flat = np.array([t for i in ids for t in i], dtype=np.int32)
        return flat, counts


def _special_token(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: the text itself,
    or a serialized AddedToken (``{"content": ...}``)."""
    return value.get("content") if isinstance(value, dict) else value


class HuggingFaceTokenizer:
    """A Hugging Face tokenizer folder (``tokenizer.json``, e.g. LLaMA-3's), run by the ``tokenizers``
    library: ``encode`` gives the ids of ``AutoTokenizer.from_pretrained(folder).encode(text,
    add_special_tokens=False)``. AutoTokenizer's default also runs the folder's post-processor, which
    for LLaMA-3 prepends ``<|begin_of_text|>``; here, as with SentencePiece, BOS is left to the callers.

    bos/eos/pad tokens are read from ``tokenizer_config.json`` and ``special_tokens_map.json`` as
    transformers reads them. A folder naming no BOS uses its EOS (GPT-2's convention: the document
    separator starts a text); no pad means EOS, as for SentencePiece. ``vocab_size`` is the highest id
    plus one, added tokens included. ``decode`` drops special tokens, as SentencePiece's drops its
    control ids, and does no HF "clean-up" of spaces, so ``decode(encode(text)) == text``.
    """

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        tokenizer_file = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"tokenizer folder {folder} has no tokenizer.json (HuggingFaceTokenizer's "
                                    "--tokenizer-model is a Hugging Face tokenizer folder)")
        self.folder = folder
        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        self.vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        tokens = self._special_tokens(folder)
        if tokens.get("eos_token") is None:
            raise ValueError(f"tokenizer folder {folder} names no eos_token (tokenizer_config.json or "
                             "special_tokens_map.json): it is the end-of-document id")
        self.eos_id = self._token_id(tokens["eos_token"])
        self.bos_id = self._token_id(tokens["bos_token"]) if tokens.get("bos_token") is not None else self.eos_id
        self.pad_id = self._token_id(tokens["pad_token"]) if tokens.get("pad_token") is not None else self.eos_id

    @staticmethod
    def _special_tokens(folder: str) -> dict:
        """bos/eos/pad tokens as transformers resolves them: tokenizer_config.json's, overridden by
        special_tokens_map.json's only in older folders, whose config has no ``added_tokens_decoder``."""
        def read(name: str) -> dict:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                return {}
            with open(path, encoding="utf-8") as f:
                return json.load(f)

        config = read("tokenizer_config.json")
        sources = [config] if "added_tokens_decoder" in config else [config, read("special_tokens_map.json")]
        tokens = {}
        for source in sources:
            tokens.update({key: _special_token(source[key]) for key in ("bos_token", "eos_token", "pad_token")
                           if key in source})
        return tokens

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} of tokenizer folder {self.folder} is not in its tokenizer.json")
        return token_id

    @property
    def eod(self) -> int:
        return self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tokenizer.id_to_token(int(i))

    def encode_batch(self, texts: list[str], append_eod: bool = False, num_threads: int | None = None):
        """Ids of every text as one flat int32 array and the per-text counts (int64); with
        ``append_eod`` each text's ids end with ``eos_id``. ``num_threads`` is not used: the
        ``tokenizers`` library picks its own threads (TOKENIZERS_PARALLELISM / RAYON_NUM_THREADS)."""
        ids = [e.ids for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]
        if append_eod:
            for i in ids:
                i.append(self.eos_id)
        counts = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(counts.sum()))
        return flat, counts


def load_tokenizer(path: str, tokenizer_type: str | None = None):
    """The tokenizer stored at ``path``: a Hugging Face tokenizer folder (``tokenizer.json``) or a
    SentencePiece ``.model`` file, told apart by what ``path`` is unless ``tokenizer_type`` says."""
    if tokenizer_type is None:
        tokenizer_type = "HuggingFaceTokenizer" if os.path.isdir(path) else "SentencePieceTokenizer"
    return build_tokenizer(tokenizer_type, path)


def build_tokenizer(tokenizer_type: str, model_path: str | None = None, vocab_size: int | None = None):
    """Megatron's ``--tokenizer-type``: ``SentencePieceTokenizer`` (alias ``Llama2Tokenizer``,
    ``GPTSentencePieceTokenizer``) with a ``.model`` file as ``--tokenizer-model``,
    ``HuggingFaceTokenizer`` with a Hugging Face tokenizer folder as ``--tokenizer-model``, or
    ``NullTokenizer`` with a vocab size."""
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                          "HuggingFaceTokenizer"):
        if not model_path:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
        if tokenizer_type == "HuggingFaceTokenizer":
            return HuggingFaceTokenizer(model_path)
        return SentencePieceTokenizer(model_path)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}: use SentencePieceTokenizer, "
                     "HuggingFaceTokenizer or NullTokenizer")


def train_sentencepiece(sentences, vocab_size: int, output_prefix: str, input_sentence_size: int = 0,
                        seed_sentencepiece_size: int = 1_000_000, num_threads: int | None = None, **overrides) -> str:
    """Train LLaMA's kind of tokenizer on an iterable of sentences; writes ``PREFIX.model`` and
    ``PREFIX.vocab`` atomically and returns the model path. ``input_sentence_size`` > 0 samples
    that many sentences (reservoir sampling inside SentencePiece) from large corpora."""
    settings = dict(LLAMA_TRAINER_SETTINGS, **overrides)
    tmp_prefix = f"{output_prefix}.tmp{os.getpid()}"
    parent = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(parent, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=tmp_prefix,
            vocab_size=vocab_size,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
            **settings,
        )
        os.replace(tmp_prefix + ".vocab", output_prefix + ".vocab")
        os.replace(tmp_prefix + ".model", output_prefix + ".model")
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + ext):
                os.remove(tmp_prefix + ext)
    return output_prefix + ".model"
