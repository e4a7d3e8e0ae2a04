import logging


def init_logger(name):
    logger = logging.getLogger(name)
    # vLLM's once-per-message variants (0.33's attention module calls debug_once)
    logger.debug_once, logger.info_once, logger.warning_once = logger.debug, logger.info, logger.warning
    return logger
