"""The executor flags the data tools share (--executor, --ray-address)."""

from __future__ import annotations

import argparse

from megallama.executors import EXECUTORS, Executor, make_executor


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="where tasks run: 'local' (--workers processes on this machine, the default) or "
                             "'ray' (every CPU of a Ray cluster; needs pip install -e .[cluster]); "
                             "the output is the same")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="with --executor ray: the cluster to use (e.g. HEAD_IP:6379; default: the running "
                             "cluster if there is one, e.g. started by `ray start`, else a local one is started)")


def executor_from_args(args: argparse.Namespace) -> Executor:
    """The executor the flags name; a RuntimeError (one line) if it cannot be built."""
    if args.ray_address and args.executor != "ray":
        raise ValueError("--ray-address needs --executor ray")
    return make_executor(args.executor, args.workers, args.ray_address)
