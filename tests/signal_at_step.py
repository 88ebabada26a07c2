"""Run the ``evit`` command line, sending this process a real signal after optimizer step N.

    python tests/signal_at_step.py SIGKILL 23 train --recipe ... --out ...

The tests of runs that lose nothing use it: the training loop holds no test switch; this script
installs :func:`evit.train.train`'s ``on_step`` hook, and the signal is delivered by the kernel as
a user's Ctrl-C (SIGINT), a scheduler's SIGTERM or the OOM killer's SIGKILL would be.
"""
import functools
import os
import signal
import sys

import evit.train
from evit.cli import main


def signal_at(signum: int, at: int):
    def hook(step: int) -> None:
        if step == at:
            os.kill(os.getpid(), signum)

    return hook


if __name__ == "__main__":
    signum, at = signal.Signals[sys.argv[1]], int(sys.argv[2])
    evit.train.train = functools.partial(evit.train.train, on_step=signal_at(signum, at))
    sys.exit(main(sys.argv[3:]))
