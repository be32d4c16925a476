"""``modapt train`` (the training loop arrives with the main-job issue)."""

from __future__ import annotations

from .errors import ModaptError


def configure(parser) -> None:
    def run(args) -> int:
        raise ModaptError("modapt train is not implemented yet")

    parser.set_defaults(run=run)
