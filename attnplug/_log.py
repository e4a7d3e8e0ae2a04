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
