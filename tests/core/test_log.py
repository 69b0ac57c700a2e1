"""The library's log lines (nanovllm/utils/log.py): "[Name] message" on standard output, through the "nanovllm"
logger's own handler, which does not propagate to the application's logging."""
import logging

from nanovllm.utils.log import get_logger


def test_log_lines_go_to_stdout_with_their_prefix(capsys, caplog, monkeypatch):
    root = logging.getLogger("nanovllm")
    monkeypatch.setattr(root, "propagate", False)  # as the library sets it (the tests' fixture turns it on)
    level = root.level
    root.setLevel(logging.INFO)  # the default of $NANOVLLM_LOG_LEVEL
    try:
        get_logger("Example").info("a %s line", "logged")
        get_logger("Example").debug("a detail")  # DEBUG: not at the default level
    finally:
        root.setLevel(level)
    assert capsys.readouterr().out == "[Example] a logged line\n"
    assert not caplog.records  # the root logger, where an application's handlers are, saw nothing
    assert get_logger("Example").name == "nanovllm.Example"
