"""Would a worker be able to run these bundles? ``pacs-agent models validate`` runs this.

For each bundle whose model card reads (:func:`pacs_agent.catalog.read_card`), the bundle is
loaded exactly as an inference worker loads it before its first series: through
:class:`workers.runtime.series.RunnerCache` into a :class:`workers.runtime.bundle.BundleRunner`,
on the CPU, with the card's ``[runtime]`` overrides and task. That parses the inference
configuration with MONAI's ``ConfigParser`` (JSON or YAML, and any file its ``%`` macros name),
resolves and builds every entry the runtime uses (``image_key``, ``network_def`` / ``network``,
``preprocessing``, ``inferer``, ``postprocessing``, with every ``@reference`` they lead to), loads
the weights (``map_location`` CPU) and loads them strictly into the network. No inference runs.

Each failure comes back with the file and configuration key that are wrong (the runtime's
:class:`~workers.runtime.bundle.BundleError` carries them).

Run as ``python -m workers.validation BUNDLE...``; the last line of stdout is one JSON object:
``{"bundles": [{"bundle", "name", "seconds", "errors": [{"file", "key", "line", "message"}]}]}``.
Exit status 0 when it could check (whatever it found), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pacs_agent.catalog import CatalogError, Problem, read_card
from workers.runtime.bundle import BundleError
from workers.runtime.series import RunnerCache

__all__ = ["check_bundle", "main"]


def check_bundle(bundle_dir: Path) -> dict[str, Any]:
    """Load ``bundle_dir`` as a worker would (CPU, the card's overrides), without running it.

    Returns ``{"bundle", "name", "seconds", "errors"}``; ``errors`` is empty when the worker
    would load it, else one entry (the first failure, as the worker would meet it) with
    ``file``, ``key``, ``line`` (each None when not known) and ``message``.
    """
    started = time.monotonic()
    name: str | None = None
    problem: Problem | None = None
    try:
        card = read_card(bundle_dir)
        name = card.name
        RunnerCache({}, "cpu").get(card)
    except CatalogError as exc:
        problem = Problem.of(bundle_dir, exc)
    except BundleError as exc:
        problem = Problem(bundle_dir, str(exc), exc.file, exc.key, exc.line)
    except Exception as exc:  # anything else the worker would fail the job with
        problem = Problem(bundle_dir, f"{bundle_dir}: {type(exc).__name__}: {exc}")
    return {
        "bundle": str(bundle_dir),
        "name": name,
        "seconds": round(time.monotonic() - started, 2),
        "errors": [] if problem is None else [problem.as_dict()],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (``pacs-agent models validate`` runs it)."""
    parser = argparse.ArgumentParser(
        prog="python -m workers.validation",
        description="Load bundles as a worker would, without running them; print JSON.",
    )
    parser.add_argument("bundles", nargs="+", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # Libraries may print while a bundle loads; stdout carries only the report, on its last line.
    with contextlib.redirect_stdout(sys.stderr):
        report = {"bundles": [check_bundle(b.expanduser().resolve()) for b in args.bundles]}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
