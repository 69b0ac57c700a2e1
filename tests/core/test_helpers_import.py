"""The test helpers are one module under one name, whichever test file imports them."""
import sys

import tests.helpers
import tests.modes.pd_helpers


def test_helpers_are_imported_under_one_name_only():
    assert sys.modules["tests.helpers"] is tests.helpers
    assert sys.modules["tests.modes.pd_helpers"] is tests.modes.pd_helpers
    assert not {"helpers", "pd_helpers", "conftest", "kernel_checks"} & set(sys.modules)
