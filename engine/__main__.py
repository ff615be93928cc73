"""``python -m engine``.

Ctrl-C is taken over first, before the CLI (and torch) is imported: outside a run nothing is being
written, so it ends the command at once with exit code 130 and no traceback. A run installs its
own handler while it trains (`Trainer.signals`: finish the step, checkpoint, exit 130).
"""

import os
import signal
import sys


def interrupted(number: int, frame: object) -> None:
    # os.write: the signal may arrive while sys.stderr is being written, and its buffer is not
    # reentrant. SystemExit unwinds quietly (finally blocks run, nothing is printed).
    os.write(2, b"interrupted\n")
    raise SystemExit(128 + number)


def launch() -> None:
    signal.signal(signal.SIGINT, interrupted)
    from .cli import main

    sys.exit(main())


if __name__ == "__main__":
    launch()
