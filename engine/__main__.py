"""``python -m engine``.

Ctrl-C (and SIGTERM) is taken over first, before the CLI (and torch) is imported. Outside a run
nothing of value is being written, so it ends the command there and then: one line, exit code
130 (143), the temporary files being written removed, and no Python code run after it (a
KeyboardInterrupt or a SystemExit raised inside an import, a finalizer or a library's ``except
BaseException`` could be swallowed, turned into another error or printed as a traceback). A run
installs its own handlers while it trains (`Trainer.signals`: finish the step, checkpoint, exit
130 or 143).
"""

import os
import signal
import sys


def interrupted(number: int, frame: object) -> None:
    # os.write: the signal may arrive while sys.stderr is being written, and its buffer is not
    # reentrant.
    os.write(2, b"interrupted\n")
    runs = sys.modules.get("engine.runs")
    if runs is not None:
        runs.remove_in_flight()
    os._exit(128 + number)


for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, interrupted)


def own_package() -> None:
    """Make ``engine`` this package, whatever the working directory holds.

    ``python -m`` puts the working directory first on sys.path. A folder there named ``engine``
    (a clone of this repository, say) then becomes the package, as a namespace package when it
    has no ``__init__.py``: path entries are searched before the finder of an editable install,
    which is what found this file. Its subfolders would shadow this package's modules
    (``engine.plugins``), so the package is imported again from here.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    package = sys.modules.get("engine")
    if package is not None and getattr(package, "__file__", None) == os.path.join(here, "__init__.py"):
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "engine", os.path.join(here, "__init__.py"), submodule_search_locations=[here]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine"] = module
    spec.loader.exec_module(module)


def launch() -> None:
    own_package()
    from engine.cli import main

    sys.exit(main())


if __name__ == "__main__":
    launch()
