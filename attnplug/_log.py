"""attnplug's logger: one ``attnplug`` namespace, printed on its own unless the host configured it."""

import logging
import os

logger = logging.getLogger("attnplug")

if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("attnplug %(levelname)s [pid %(process)d]: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(os.environ.get("ATTNPLUG_LOG_LEVEL", "INFO").upper())
    logger.propagate = False

_said: set[str] = set()


def log_once(message: str) -> None:
    """Log ``message`` at INFO the first time this process says it (fall-backs: one line per reason)."""
    if message not in _said:
        _said.add(message)
        logger.info("%s", message)
