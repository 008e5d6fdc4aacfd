"""Tokenizers: SentencePiece models (LLaMA's, or one trained by tools/train_tokenizer.py) and a
null tokenizer for data that is already ids.

``encode_batch`` is the fast path preprocessing uses: SentencePiece never merges across a space,
so ids are memoised per whitespace chunk (in C++) and SentencePiece runs only on chunks not seen
before. It returns exactly SentencePiece's ids; models whose normalizer rewrites spaces fall back
to SentencePiece's own batch encode.
"""
from __future__ import annotations

import os

import numpy as np
import sentencepiece as spm

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
        self._cache = None
        if self.supports_chunk_cache:
            # loaded here, not on first use: preprocessing forks workers after construction
            import torch  # noqa: F401  (the extension links against torch's libraries)

            from megallama import _data

            self._cache = _data.ChunkCache(self.add_dummy_prefix, cache_entries)
        # ids of a lone space chunk (a single trailing space): what SentencePiece gives the word "▁"
        self._lone_space = self.sp.encode("a ")[len(self.sp.encode("a")):]

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

    def _encode_keys(self, keys: list[str], num_threads: int) -> list[list[int]]:
        # A key is the chunk as SentencePiece sees it inside the text: with a dummy prefix every key
        # starts with the space that SentencePiece's encode adds back in front.
        if not self.add_dummy_prefix:
            return self.sp.encode(keys, num_threads=num_threads)
        texts = [k[1:] for k in keys]
        ids = self.sp.encode(texts, num_threads=num_threads)
        return [self._lone_space if t == "" else i for t, i in zip(texts, ids)]

    def encode_batch(self, texts: list[str], append_eod: bool = False, num_threads: int = 1):
        """Ids of every text as one flat int32 array and the per-text counts (int64).

        With ``append_eod`` each text's ids end with ``eos_id``. Identical to SentencePiece's ids.
        """
        if not self.supports_chunk_cache:
            ids = self.sp.encode(list(texts), num_threads=num_threads)
            if append_eod:
                ids = [i + [self.eos_id] for i in ids]
            counts = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter((t for i in ids for t in i), dtype=np.int32, count=int(counts.sum()))
            return flat, counts
        misses = self._cache.scan(list(texts))
        ids = self._encode_keys(misses, num_threads) if misses else []
        return self._cache.finish(ids, self.eos_id if append_eod else -1)

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

    def encode_batch(self, texts: list[str], append_eod: bool = False, num_threads: int = 1):
        ids = [self.encode(t) + ([self.eos_id] if append_eod else []) for t in texts]
        counts = np.array([len(i) for i in ids], dtype=np.int64)
        flat = np.array([t for i in ids for t in i], dtype=np.int32)
        return flat, counts


def build_tokenizer(tokenizer_type: str, model_path: str | None = None, vocab_size: int | None = None):
    """Megatron's ``--tokenizer-type``: ``SentencePieceTokenizer`` (alias ``Llama2Tokenizer``,
    ``GPTSentencePieceTokenizer``) with ``--tokenizer-model``, or ``NullTokenizer`` with a vocab size."""
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        if not model_path:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
        return SentencePieceTokenizer(model_path)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}: use SentencePieceTokenizer or NullTokenizer")


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
