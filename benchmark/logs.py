"""Logging set-up shared by the command line and the processes the launchers start."""
from __future__ import annotations

import logging
import sys


def setup_logging(verbose: int = 0) -> None:
    """Log to stderr: warnings only (``verbose < 0``), info (0) or debug (> 0)."""
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    logging.getLogger("auto-attack").setLevel(max(level, logging.WARNING))
