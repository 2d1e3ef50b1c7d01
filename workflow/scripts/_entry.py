"""What the workflow's `script:` entry points share: fedsweep importable, and one-line errors.

A `script:` runs in its own Python process with a `snakemake` object (its input, output,
params, log). The entry points only unpack that object and call the package; everything they
print goes to the rule's log, and a FedsweepError becomes the rule's one-line error, as the
`fedsweep` CLI prints it (`fedsweep: error: ...`), on the console too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator


def _importable() -> None:
    """fedsweep installed, else this repository's copy (a Snakemake outside fedsweep's env)."""
    try:
        import fedsweep  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))


_importable()


@contextlib.contextmanager
def logged(log: str) -> Iterator[None]:
    """stdout and stderr into ``log`` while the block runs."""
    with open(log, "w") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        yield


def run(log: str, step: Callable[[], object]) -> None:
    """Run ``step`` with its output in ``log``; a FedsweepError exits 1 with one line on stderr
    (and in the log), like the CLI."""
    from fedsweep import FedsweepError

    try:
        with logged(log):
            try:
                step()
            except FedsweepError as exc:
                line = f"fedsweep: error: {' '.join(str(exc).splitlines())}"
                print(line, file=sys.stderr)
                raise SystemExit(line) from None
    except SystemExit as stop:
        print(f"error (log: {log}): {stop.code}", file=sys.stderr)
        sys.exit(1)
