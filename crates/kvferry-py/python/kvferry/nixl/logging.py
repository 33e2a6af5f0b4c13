"""NIXL's logging setup (``nixl.logging.get_logger``): loggers under
``nixl``, one console handler on stdout at INFO, ``NIXL_LOG_LEVEL`` (TRACE,
DEBUG, INFO, WARN, ERROR, FATAL) overriding the level."""

from __future__ import annotations

import logging
import logging.config
import os

__all__ = ["get_logger", "setup_logging", "set_log_level_by_env", "LOGGING_CONFIG"]

_configured = False

LOGGING_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "simpleFormatter": {
            "format": "%(asctime)s NIXL %(levelname)-7s %(filename)s:%(lineno)d %(message)s",
            "datefmt": "%Y-%m-%d %H:%M:%S",
        }
    },
    "handlers": {
        "consoleHandler": {
            "class": "logging.StreamHandler",
            "level": "INFO",
            "formatter": "simpleFormatter",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {"nixl": {"level": "INFO", "handlers": ["consoleHandler"], "propagate": False}},
}

_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
    "FATAL": logging.CRITICAL,
}


def set_log_level_by_env(nixl_logger: logging.Logger) -> None:
    """Applies ``NIXL_LOG_LEVEL`` to ``nixl_logger``, warning on bad values."""
    value = os.getenv("NIXL_LOG_LEVEL")
    if not value:
        return
    level = _LEVELS.get(value.upper())
    if level is None:
        nixl_logger.warning("Invalid NIXL_LOG_LEVEL value '%s'. Using configuration default.", value)
        return
    nixl_logger.setLevel(level)
    for h in nixl_logger.handlers:
        h.setLevel(level)


def setup_logging() -> None:
    """Configures the ``nixl`` logger once."""
    global _configured
    if _configured:
        return
    logging.config.dictConfig(LOGGING_CONFIG)
    set_log_level_by_env(logging.getLogger("nixl"))
    _configured = True


def get_logger(name: str) -> logging.Logger:
    """The logger ``nixl.<name without leading underscores>``."""
    setup_logging()
    return logging.getLogger(f"nixl.{name.lstrip('_')}")
