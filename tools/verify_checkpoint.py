#!/usr/bin/env python
"""Check a megallama checkpoint folder without loading a model: its index reads, every rank file is
present with the size and SHA-256 recorded at save time (checkpoints written before checksums: every
file loads). Exit status 0 when the checkpoint is whole, 1 when not (each problem on its own line,
with the previous complete checkpoint to fall back to).

    python tools/verify_checkpoint.py ckpt                  # the iteration the tracker names
    python tools/verify_checkpoint.py ckpt --iteration 100
"""
import argparse
import sys

from megallama.checkpoint.storage import previous_complete_iteration, verify_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the --save folder of a run (holding latest_checkpointed_iteration.txt)")
    p.add_argument("--iteration", type=int, default=None,
                   help="check this iteration's checkpoint instead of the one the tracker names")
    args = p.parse_args(argv)
    report = verify_checkpoint(args.folder, args.iteration, progress=True)
    where = f"iteration {report.iteration} ({report.iter_dir})" if report.iter_dir else args.folder
    for path in report.stale_temporaries:
        print(f"note: {path} is left from an interrupted save (removed when a run next starts with --save here)")
    if report.problems:
        for problem in report.problems:
            print(f"error: {problem}", file=sys.stderr)
        if report.iter_dir is not None:  # a folder that is there but damaged: the way back
            back = previous_complete_iteration(args.folder, report.iteration)
            print(f"checkpoint of {where} is damaged; " + (
                f"the previous complete checkpoint is iteration {back} (--ckpt-step {back})" if back is not None
                else "no earlier complete checkpoint"), file=sys.stderr)
        return 1
    how = "sizes and SHA-256 match" if report.checksummed else "written before checksums: every file loads"
    print(f"checkpoint of {where} is complete: {report.files_checked} rank files, {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
