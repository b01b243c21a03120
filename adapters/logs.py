"""`configure_logging(level)`: the one log format of every metalora process (gateway, worker, CLI tools)."""
from __future__ import annotations

import logging
from typing import Literal

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def configure_logging(level: str = "INFO") -> None:
    """Root logging to stderr in the metalora format, at `level` (a LogLevel, any case). A no-op when the root
    logger already has a handler (the CLI, or pytest, configured it first)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
