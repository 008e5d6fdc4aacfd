"""Test data generators and a loader for the tools/ scripts."""
import importlib.util
import os

import numpy as np

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Der schnelle braune Fuchs springt über den faulen Hund. Größe, Übung, Straße.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ",
    "다람쥐 헌 쳇바퀴에 타고파",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "نص حكيم له سر قاطع وذو شأن عظيم",
    "def f(x):\n    return x ** 2  # squares\n\n\tprint(f(12345))",
    "Prices: $1,299.99 → 3.14159 × 10^23; call 555-0123 or +44 20 7946 0958.",
    "emoji 😀🚀 and symbols ∑∫√ ≠ ≤ ≥ plus a literal ▁ marker and ▁▁ twice",
]


# characters a tokenizer trained on SAMPLES has never seen (byte fallback or unk)
RARE = ["龘", "𝔘", "ꙮ", "\x00", "\u200b", "🦙", "ǅ"]


def varied_text(rng: np.random.Generator, n_docs: int, rare: bool = False) -> list[str]:
    """Documents mixing languages, code, digits, runs of spaces, tabs and newlines, and edge cases;
    with ``rare``, also characters outside the training text (next to spaces and newlines too)."""
    seps = [" ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "", "\u3000", "\r\n"]
    docs = ["", " ", "  ", "a", " a", "a ", "a  ", "\n", "1234567890", "▁", " ▁ ", "x▁ y"]
    for _ in range(n_docs - len(docs)):
        parts = []
        for _ in range(int(rng.integers(1, 12))):
            words = SAMPLES[int(rng.integers(len(SAMPLES)))].split(" ")
            k = int(rng.integers(1, len(words) + 1))
            start = int(rng.integers(0, len(words) - k + 1))
            parts.append(" ".join(words[start:start + k]))
            parts.append(seps[int(rng.integers(len(seps)))])
            if rng.random() < 0.2:
                parts.append(str(int(rng.integers(0, 10 ** int(rng.integers(1, 12))))))
            if rare and rng.random() < 0.3:
                parts.append("".join(RARE[int(k)] for k in rng.integers(0, len(RARE), size=int(rng.integers(1, 4)))))
        text = "".join(parts)
        if rng.random() < 0.2:
            text = " " * int(rng.integers(1, 4)) + text
        docs.append(text)
    return docs


def load_tool(name: str):
    """tools/NAME.py as a module (tools/ are scripts, not a package)."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"megallama_tool_{name}", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
