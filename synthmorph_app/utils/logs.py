"""Warnings a job logged, kept with its results.

A BIDS-App run over many subjects prints the engine's warnings (a field of view smaller than a
head, a qform that disagrees with the sform, intensities that run opposite to the template's)
among thousands of lines; :func:`collected_warnings` keeps them so the sidecars, the subject
report and the group QC can show them beside the registration they concern.

>>> import logging
>>> with collected_warnings() as warned:
...     logging.getLogger('synthmorph_app.example').warning('odd header')
...     logging.getLogger('synthmorph_app.example').warning('odd header')
...     logging.getLogger('synthmorph_app.example').info('not a warning')
>>> warned
['odd header']
"""

from __future__ import annotations

import logging
from contextlib import contextmanager


class _Collector(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(level=logging.WARNING)
        self.messages = messages

    def emit(self, record):
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


@contextmanager
def collected_warnings(logger: str = 'synthmorph_app'):
    """Collect the messages logged at WARNING or above under ``logger`` (and its children)
    inside the block: a list, in order, each message once."""
    messages: list[str] = []
    handler = _Collector(messages)
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield messages
    finally:
        target.removeHandler(handler)


def merged(*lists) -> list[str]:
    """The messages of ``lists`` in order, each once."""
    out: list[str] = []
    for messages in lists:
        out.extend(m for m in messages or () if m not in out)
    return out


def set_nipype_level(level: str) -> None:
    """Nipype's workflow and interface messages at ``level`` (its utils at WARNING), in this
    process: the command's, and again in MultiProc workers that do not inherit it
    (:mod:`synthmorph_app.cli.workers`)."""
    from nipype import config
    from nipype import logging as nlogging

    config.update_config({'logging': {'workflow_level': level, 'interface_level': level,
                                      'utils_level': 'WARNING'}})
    nlogging.update_logging(config)
