"""Named RNG states, so that tensor-parallel ranks draw the same numbers where they must and
different ones where they must.

``model_parallel_manual_seed(seed)`` seeds the default generator with ``seed`` on every rank (so
the full "master" weights that every rank builds before keeping its shard are identical, and equal
to the serial model's), and registers the state ``"model-parallel-rng"`` seeded differently on each
tensor-parallel rank, for randomness inside the split region (``with get_rng_tracker().fork():``).
States live on the CPU generator for a CPU run and on the current CUDA device's for a GPU run.
"""
import contextlib

import torch

from megallama.parallel.state import get_tensor_model_parallel_rank

MODEL_PARALLEL_RNG = "model-parallel-rng"
# Megatron's offset, so that the tensor-parallel streams do not coincide with the default one.
_TENSOR_PARALLEL_SEED_OFFSET = 2718


def _default_device_type():
    # torch.accelerator answers without touching CUDA on a CPU build.
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator().type
    return "cpu"


def _get_state(device_type):
    return torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()


def _set_state(device_type, state):
    if device_type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states; ``fork(name)`` runs a block on that state and keeps its advance."""

    def __init__(self):
        self._states = {}  # name -> (device type, state)
        self._seeds = set()

    def reset(self):
        self._states.clear()
        self._seeds.clear()

    def get_states(self):
        """A copy of every named state (for checkpoints)."""
        return {name: (device, state.clone()) for name, (device, state) in self._states.items()}

    def set_states(self, states):
        self._states = {name: (device, state.clone()) for name, (device, state) in states.items()}

    def add(self, name, seed, device_type=None):
        device_type = device_type or _default_device_type()
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"RNG states live on 'cpu' or 'cuda', not {device_type!r}")
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists")
        if seed in self._seeds:
            raise ValueError(f"seed {seed} is already used by another RNG state")
        if device_type == "cuda":
            saved = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(seed)
            state = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(saved)
        else:
            state = torch.Generator().manual_seed(seed).get_state()
        self._seeds.add(seed)
        self._states[name] = (device_type, state)

    @contextlib.contextmanager
    def fork(self, name=MODEL_PARALLEL_RNG):
        if name not in self._states:
            raise KeyError(f"RNG state {name!r} was never added (call model_parallel_manual_seed first)")
        device_type, state = self._states[name]
        saved = _get_state(device_type)
        _set_state(device_type, state)
        try:
            yield
        finally:
            self._states[name] = (device_type, _get_state(device_type))
            _set_state(device_type, saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker():
    return _TRACKER


def model_parallel_manual_seed(seed, device_type=None):
    """Seed the default generator with ``seed`` (same on every rank) and the tracker's
    ``"model-parallel-rng"`` state with a seed that differs per tensor-parallel rank."""
    torch.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(
        MODEL_PARALLEL_RNG, seed + _TENSOR_PARALLEL_SEED_OFFSET + get_tensor_model_parallel_rank(), device_type
    )
