"""``torchrun [torchrun flags] -m megallama.pretrain [flags]``: pretrain LLaMA (``--help`` for the flags).

A bad configuration is reported before any work and every rank exits with status 2 (ranks launched
with different flags or files: as soon as the process group exists); a run that must
stop (non-finite loss, a damaged checkpoint or one that does not fit the model) exits with status 1.
Every rank that fails writes its own one-line message to stderr (with its rank under torchrun) and
to torchrun's error file, so the first cause shows whichever rank hit it and whichever exited first.
SIGTERM, SIGINT or SIGUSR1 (``--exit-signal-handler``) ends the run after the current iteration,
saved, with status 0 on every rank.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

from megallama.training.arguments import ConfigError, parse_args


def _report(error: Exception) -> None:
    """One line on stderr, naming the rank when torchrun started several; the same into torchrun's
    error file (``TORCHELASTIC_ERROR_FILE``), which its failure summary shows. Call inside ``except``."""
    rank = f"[rank {os.environ.get('RANK', '?')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"megallama.pretrain: error: {rank}{error}", file=sys.stderr, flush=True)
    get_error_handler().record_exception(error)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        config = parse_args(argv)
    except ConfigError as error:
        _report(error)
        return 2
    from megallama.checkpoint.storage import CheckpointError
    from megallama.training.loop import Trainer, TrainingError, shutdown

    try:
        Trainer(config).train()  # ranks launched with other flags or files: a ConfigError before any work
    except ConfigError as error:
        _report(error)
        return 2
    except (TrainingError, CheckpointError) as error:
        _report(error)
        return 1
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(record(main)())
