"""Loads the compiled extension ``megallama._ops``; a missing build is an error, not a fallback."""
import torch  # noqa: F401  (the extension links against torch's libraries: load them first)

try:
    from megallama import _ops
except ImportError as exc:
    raise ImportError(
        "megallama's compiled extension megallama._ops is missing or failed to load "
        f"({exc}). Build it from the repository root with `pip install --no-build-isolation -e .` "
        "(or `MEGALLAMA_EXTENSIONS=ops python setup.py build_ext --inplace`)."
    ) from exc

__all__ = ["_ops"]
