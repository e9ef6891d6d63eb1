"""The installed package's version, for the command lines' --version."""

from __future__ import annotations

import importlib.metadata

DISTRIBUTION_NAME = "pbft-ledger"


def package_version() -> str:
    """The version pip installed; run from a source tree without installing, it says so."""
    try:
        return importlib.metadata.version(DISTRIBUTION_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: version unknown)"
