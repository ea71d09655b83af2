"""Which requests uvicorn's access log writes a line for (``--access-log``).

A live camera pushes a frame a second, so at a few hundred streams the access log would be hundreds of lines a
second, each formatted and written on the event loop that serves every stream: on the 2-core CPU host that was
nearly a fifth of the server's CPU per pushed frame (1.57 against 1.28 ms, docs/benchmarks.md).
``except-frames`` (the default) keeps every other request's line and every refused push's line (status >= 400),
and drops only the accepted frame pushes.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

ACCESS_LOG_MODES = ("all", "except-frames", "off")
ACCESS_LOGGER = "uvicorn.access"


class SkipAcceptedFramePushes(logging.Filter):
    """Drops uvicorn's access record of an accepted ``POST /v1/sessions/{id}/frames``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_accepted_frame_push(record.args)


def is_accepted_frame_push(args: object) -> bool:
    # uvicorn's access record: (client address, method, path with query, HTTP version, status code)
    if not isinstance(args, tuple) or len(args) != 5:
        return False
    _, method, full_path, _, status = args
    return (method == "POST" and isinstance(status, int) and status < 400
            and urlsplit(str(full_path)).path.endswith("/frames"))


def filter_access_log(mode: str) -> None:
    """Put the access logger's filter for ``mode`` on (``off`` is uvicorn's own ``access_log=False``)."""
    if mode not in ACCESS_LOG_MODES:
        raise ValueError(f"access log mode {mode!r}: one of {', '.join(ACCESS_LOG_MODES)}")
    logger = logging.getLogger(ACCESS_LOGGER)
    for old in [f for f in logger.filters if isinstance(f, SkipAcceptedFramePushes)]:
        logger.removeFilter(old)
    if mode == "except-frames":
        logger.addFilter(SkipAcceptedFramePushes())
