"""Starts the Triton interpreter's subprocess (tests/kernels/triton_interpreter.py) as soon as the tests are
collected, so that it runs beside the rest of the suite."""
from tests.kernels import triton_interpreter


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    jobs = [(item.path, item.callspec.params["kind"]) for item in session.items
            if item.originalname == "test_interpreter" and not item.get_closest_marker("skip")
            and not any(m.args and m.args[0] for m in item.iter_markers("skipif"))]
    triton_interpreter.start(jobs)


def pytest_sessionfinish(session):
    triton_interpreter.stop()
