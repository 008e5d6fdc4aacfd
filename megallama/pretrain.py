"""``torchrun [torchrun flags] -m megallama.pretrain [flags]``: pretrain LLaMA (``--help`` for the flags).

A bad configuration is reported before any work, as one line on each node's first process, and
every rank exits with status 2; a run that must stop (non-finite loss, a checkpoint that does not
fit the model) exits with status 1.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from megallama.training.arguments import ConfigError, parse_args


def _report(message: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"megallama.pretrain: error: {message}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        config = parse_args(argv)
    except ConfigError as error:
        _report(str(error))
        return 2
    from megallama.training.checkpointing import CheckpointError
    from megallama.training.loop import Trainer, TrainingError, shutdown

    try:
        Trainer(config).train()
    except (TrainingError, CheckpointError) as error:
        _report(str(error))
        return 1
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
