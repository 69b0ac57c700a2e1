"""The library's logging: every logger is a child of "nanovllm" and its lines read "[Name] message", the
prefixes users grep for ([ModelRunner], [GreenContextManager], [PD], ...).

Start-up lines that users rely on are INFO, details (timings, profiles) DEBUG. The "nanovllm" logger
writes to standard output at the level of $NANOVLLM_LOG_LEVEL (default INFO) and does not propagate,
so an application's own logging configuration neither doubles nor hides them; set the variable to
WARNING for a quiet engine, or DEBUG for everything.
"""
import logging
import os
import sys

ROOT = "nanovllm"


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged (a test or a notebook may replace it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.prefix = record.name.removeprefix(ROOT + ".")
        return super().format(record)


def get_logger(name: str) -> logging.Logger:
    """The logger whose lines start with [name]."""
    return logging.getLogger(f"{ROOT}.{name}")


def _configure() -> None:
    root = logging.getLogger(ROOT)
    handler = _Stdout()
    handler.setFormatter(_Format("[%(prefix)s] %(message)s"))
    root.addHandler(handler)
    root.setLevel(os.environ.get("NANOVLLM_LOG_LEVEL", "INFO").upper())
    root.propagate = False


_configure()
