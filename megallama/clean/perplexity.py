"""CCNet's n-gram language-model filter (Wenzek et al. 2020), the third step of the paper's
CommonCrawl recipe: a 5-gram KenLM model over SentencePiece pieces, trained on Wikipedia, scores
each page; the page's perplexity puts it in the head / middle / tail bucket by the 30th and 60th
percentiles of a sample of pages, and the run keeps the buckets asked for (RedPajama: head, middle).

Scoring follows CCNet's `DocLM`: each paragraph (line) is normalised (`text_normalizer.normalize`:
lower case, accents stripped, digits to 0, unicode punctuation replaced, control characters
removed), cut into SentencePiece pieces and scored by KenLM with sentence boundaries; the log10
probabilities and lengths (pieces + 1 per line) are summed over the page, and the perplexity is
10 ** (-log10 prob / length), rounded to 0.1. (CCNet's `mine.py` normalises the whole page at
once, which deletes the newlines and glues the last word of a line to the first of the next
before DocLM splits on them; scoring per paragraph is what DocLM means to do.)

Training streams normalised, tokenised Wikipedia lines into KenLM's `lmplz` (modified Kneser-Ney,
interpolated), built by `tools/build_kenlm.sh`. Beside the model `M` go `M.sp.model` (the
tokenizer) and `M.json` (order, counts, and the bucket cut-offs when a sample was given).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from megallama.clean.io import read_json, write_json
from megallama.fileio import atomic_path

BUCKETS = ("head", "middle", "tail")
CCNET_PERCENTILES = (30, 60)  # head below the 30th percentile, tail from the 60th
DEFAULT_KENLM_DIR = os.path.join(os.path.expanduser("~"), ".cache", "megallama", "kenlm-0.3.0")

# CCNet's text_normalizer tables, as str.translate tables (the same mapping, one C pass)
_UNICODE_PUNCT = {
    "，": ",", "。": ".", "、": ",", "„": '"', "”": '"', "“": '"', "«": '"', "»": '"', "１": '"',
    "」": '"', "「": '"', "《": '"', "》": '"', "´": "'", "∶": ":", "：": ":", "？": "?", "！": "!",
    "（": "(", "）": ")", "；": ";", "–": "-", "—": " - ", "．": ". ", "～": "~", "’": "'",
    "…": "...", "━": "-", "〈": "<", "〉": ">", "【": "[", "】": "]", "％": "%", "►": "-",
}
_PUNCT_TABLE = str.maketrans(_UNICODE_PUNCT)
_NON_PRINTING_TABLE = str.maketrans({c: None for c in [*range(0, 32), *range(127, 160)]})
_ASCII_TABLE = str.maketrans({**{str(d): "0" for d in range(1, 10)}, **{c: None for c in [*range(0, 32), 127]}})
_DIGIT = re.compile(r"\d")


def normalize_line(line: str) -> str:
    """CCNet's `text_normalizer.normalize(line)` (accent, case, numbers, punct=1), with a fast
    path for ASCII lines (no accents or unicode punctuation to handle)."""
    line = line.strip()
    if not line:
        return line
    line = line.lower()
    if line.isascii():
        return line.translate(_ASCII_TABLE)
    line = "".join(c for c in unicodedata.normalize("NFD", line) if unicodedata.category(c) != "Mn")
    line = _DIGIT.sub("0", line)
    return line.translate(_PUNCT_TABLE).translate(_NON_PRINTING_TABLE)


def find_kenlm_tool(name: str) -> str:
    """Path of KenLM's `lmplz` or `build_binary`: $MEGALLAMA_KENLM_DIR/bin, the folder
    tools/build_kenlm.sh builds into, then PATH."""
    folders = [os.path.join(os.environ["MEGALLAMA_KENLM_DIR"], "bin")] if os.environ.get("MEGALLAMA_KENLM_DIR") else []
    for folder in folders + [os.path.join(DEFAULT_KENLM_DIR, "bin")]:
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"KenLM's {name} not found: run `bash tools/build_kenlm.sh` (part of `make install`) "
                            f"or set MEGALLAMA_KENLM_DIR to a folder holding bin/{name}")


def sidecar_paths(model_path: str) -> tuple[str, str]:
    """(tokenizer, info JSON) stored beside the model."""
    return model_path + ".sp.model", model_path + ".json"


_LOADED: dict[tuple, tuple] = {}


def _load_models(model_path: str, tokenizer_path: str) -> tuple:
    """(kenlm.Model, SentencePieceProcessor), loaded once per process and file version: workers
    forked after a load share it, and the tasks of one worker (each unpickling its own scorer)
    do not load it again (an ARPA file takes minutes)."""
    import kenlm
    import sentencepiece

    key = tuple((os.path.abspath(p), os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in (model_path, tokenizer_path))
    if key not in _LOADED:
        _LOADED[key] = (kenlm.Model(model_path), sentencepiece.SentencePieceProcessor(model_file=tokenizer_path))
    return _LOADED[key]


class NgramScorer:
    """Perplexity of texts under a KenLM model over SentencePiece pieces. Pickles as its paths
    (the models load again, once, in each worker)."""

    def __init__(self, model_path: str, tokenizer_path: str | None = None) -> None:
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"perplexity model not found: {model_path}")
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path or sidecar_paths(model_path)[0]
        if not os.path.isfile(self.tokenizer_path):
            raise FileNotFoundError(f"tokenizer of the perplexity model not found: {self.tokenizer_path} "
                                    "(tools/train_ngram_lm.py stores it beside the model)")
        self._lm = self._sp = None

    def __getstate__(self):
        return {**self.__dict__, "_lm": None, "_sp": None}

    def load(self) -> None:
        if self._lm is None:
            self._lm, self._sp = _load_models(self.model_path, self.tokenizer_path)

    def log_score(self, text: str) -> tuple[float, int]:
        """(sum of log10 probabilities, number of scored tokens) of `text`'s paragraphs."""
        self.load()
        pieces = self._sp.encode([normalize_line(line) for line in text.split("\n")], out_type=str)
        score = self._lm.score
        log10, length = 0.0, 0
        for line_pieces in pieces:
            line = " ".join(line_pieces)
            log10 += score(line)
            length += len(line.split()) + 1
        return log10, length

    def perplexity(self, text: str) -> float:
        """CCNet's document perplexity, rounded to 0.1."""
        log10, length = self.log_score(text)
        return round(10.0 ** (-log10 / length), 1)


def bucket_of(perplexity: float, cutoffs: Sequence[float]) -> str:
    """CCNet's bucket: head below the first cut-off, middle below the second, else tail."""
    head, tail = cutoffs
    return "head" if perplexity < head else "middle" if perplexity < tail else "tail"


def parse_buckets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """"head,middle" -> ("head", "middle"); a clear error for anything else."""
    names = tuple(b.strip() for b in spec.split(",")) if isinstance(spec, str) else tuple(spec)
    bad = [b for b in names if b not in BUCKETS]
    if bad or not names:
        raise ValueError(f"perplexity buckets must be among {', '.join(BUCKETS)}, got {spec!r}")
    return names


def parse_cutoffs(spec: str | Sequence[float]) -> tuple[float, float]:
    """"HEAD,TAIL" perplexities -> (head, tail), with head <= tail."""
    try:
        values = tuple(float(v) for v in (spec.split(",") if isinstance(spec, str) else spec))
    except ValueError:
        values = ()
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ValueError(f"perplexity cut-offs must be two perplexities HEAD,TAIL with 0 < HEAD <= TAIL, got {spec!r}")
    return values


class PerplexityFilter:
    """The cleaning stage: labels `perplexity` and `bucket` in a document's meta and drops it
    (reason `perplexity_BUCKET`) unless its bucket is kept. Cut-offs come from the model's
    sidecar (`tools/train_ngram_lm.py --percentiles-from`) unless given."""

    def __init__(self, model_path: str, keep: Sequence[str] = ("head", "middle"),
                 cutoffs: Sequence[float] | None = None, tokenizer_path: str | None = None) -> None:
        self.scorer = NgramScorer(model_path, tokenizer_path)
        self.keep = parse_buckets(keep)
        if cutoffs is None:
            info_path = sidecar_paths(model_path)[1]
            info = read_json(info_path) if os.path.isfile(info_path) else {}
            if "cutoffs" not in info:
                raise ValueError(f"{model_path} has no stored perplexity cut-offs ({info_path}): train it with "
                                 "--percentiles-from SAMPLE.jsonl or give --perplexity-cutoffs HEAD,TAIL")
            cutoffs = (info["cutoffs"]["head"], info["cutoffs"]["tail"])
        self.cutoffs = parse_cutoffs(cutoffs)

    def settings(self) -> dict:
        return {"perplexity_model": os.path.abspath(self.scorer.model_path),
                "perplexity_buckets": list(self.keep), "perplexity_cutoffs": list(self.cutoffs)}

    def __call__(self, meta: dict, text: str) -> str | None:
        perplexity = self.scorer.perplexity(text)
        bucket = bucket_of(perplexity, self.cutoffs)
        meta["perplexity"], meta["bucket"] = perplexity, bucket
        return None if bucket in self.keep else f"perplexity_{bucket}"


# training -----------------------------------------------------------------------------------
def tokenized_lines(texts: Iterable[str], tokenizer_path: str) -> Iterator[str]:
    """Each paragraph of `texts`, normalised and as space-separated pieces (what the LM sees)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    for text in texts:
        for pieces in sp.encode([normalize_line(line) for line in text.split("\n")], out_type=str):
            if pieces:
                yield " ".join(pieces)


class _Counted:
    """Iterates `items`, counting them in `n`."""

    def __init__(self, items: Iterable) -> None:
        self.items, self.n = items, 0

    def __iter__(self) -> Iterator:
        for item in self.items:
            self.n += 1
            yield item


def cutoffs_from_sample(scorer: NgramScorer, texts: Iterable[str],
                        percentiles: Sequence[float] = CCNET_PERCENTILES) -> dict:
    """CCNet's bucket cut-offs: the given percentiles of the sample documents' perplexities."""
    values = np.array([scorer.perplexity(t) for t in texts if t.strip()], dtype=np.float64)
    if len(values) == 0:
        raise ValueError("the percentile sample holds no documents")
    head, tail = np.percentile(values, percentiles)
    return {"head": float(head), "tail": float(tail), "percentiles": list(percentiles), "sample_docs": int(len(values))}


def train_ngram_lm(texts: Iterable[str], tokenizer_model: str, output: str, *, order: int = 5,
                   memory: str = "20%", sample: Iterable[str] | None = None,
                   percentiles: Sequence[float] = CCNET_PERCENTILES, progress: bool = True) -> dict:
    """Estimate an interpolated modified Kneser-Ney `order`-gram model of `texts` (streamed to
    KenLM's lmplz) and write it to `output`: KenLM binary when it ends in `.bin`, else ARPA.
    With `sample` (documents like those to be filtered), the bucket cut-offs are computed and
    stored. Returns the info written to `output`.json."""
    if order < 2:
        raise ValueError(f"order must be at least 2, got {order}")
    if not os.path.isfile(tokenizer_model):
        raise FileNotFoundError(f"tokenizer model not found: {tokenizer_model}")
    if os.path.isdir(output):
        raise ValueError(f"the model path {output} is a folder; name a file such as {os.path.join(output, 'lm.bin')}")
    lmplz = find_kenlm_tool("lmplz")
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    tokenizer_copy, info_path = sidecar_paths(output)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".ngram-") as tmp:
        arpa = os.path.join(tmp, "model.arpa")
        lines = 0
        with open(arpa, "wb") as arpa_out, open(os.path.join(tmp, "lmplz.log"), "w+b") as log:
            # --discount_fallback: small corpora lack the counts-of-counts the discounts need
            proc = subprocess.Popen([lmplz, "-o", str(order), "-S", memory, "-T", tmp, "--discount_fallback"],
                                    stdin=subprocess.PIPE, stdout=arpa_out, stderr=log)
            counted = _Counted(tqdm(texts, desc="n-gram LM", unit="doc", disable=not progress, mininterval=0.5))
            try:
                for line in tokenized_lines(counted, tokenizer_model):
                    proc.stdin.write(line.encode("utf-8") + b"\n")
                    lines += 1
                proc.stdin.close()
            except BrokenPipeError:
                pass  # lmplz stopped early: its exit status and log say why
            except BaseException:
                proc.kill()  # an unreadable input or Ctrl-C: lmplz would wait for the rest of its input forever
                raise
            finally:
                rc = proc.wait()
            if rc != 0:
                log.seek(0)
                raise RuntimeError(f"lmplz failed (exit {rc}): {log.read().decode('utf-8', 'replace')[-2000:]}")
        if lines == 0:
            raise ValueError("no text to train on (no input document has a non-blank line)")
        if output.endswith(".bin"):
            built = os.path.join(tmp, "model.bin")
            done = subprocess.run([find_kenlm_tool("build_binary"), arpa, built], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"build_binary failed (exit {done.returncode}): {done.stderr[-2000:]}")
            arpa = built
        info = {"order": order, "documents": counted.n, "lines": lines, "tokenizer": os.path.basename(tokenizer_copy)}
        if sample is not None:  # before anything is moved into place: a bad sample leaves no half-written model
            info["cutoffs"] = cutoffs_from_sample(NgramScorer(arpa, tokenizer_model), sample, percentiles)
        with atomic_path(output) as final:  # the umask's mode: build_binary writes 0644 whatever it is
            os.replace(arpa, final)
        shutil.copyfile(tokenizer_model, os.path.join(tmp, "tokenizer"))
        os.replace(os.path.join(tmp, "tokenizer"), tokenizer_copy)
    write_json(info_path, info)
    return info
