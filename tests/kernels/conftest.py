"""Starts the kernel checks' subprocess (tests/kernels/kernel_checks.py) as soon as the tests are collected, so
that it runs beside the rest of the suite."""
from tests.kernels import kernel_checks


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    checks = {"test_cuda": [], "test_interpreter": []}
    for item in session.items:
        if item.originalname in checks and not item.get_closest_marker("skip") \
                and not any(m.args and m.args[0] for m in item.iter_markers("skipif")):
            params = item.callspec.params
            index = params.get("index", kernel_checks.EVERY_CASE)
            checks[item.originalname].append(kernel_checks.check(item.path, params["kind"], index))
    kernel_checks.start(checks["test_cuda"], interpret=False)
    kernel_checks.start(checks["test_interpreter"], interpret=True)


def pytest_sessionfinish(session):
    kernel_checks.stop()
