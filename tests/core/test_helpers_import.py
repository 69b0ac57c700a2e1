"""The test helpers are one module under one name, whichever test file imports them."""
import sys

import tests.helpers


def test_helpers_are_imported_under_one_name_only():
    assert sys.modules["tests.helpers"] is tests.helpers
    assert "helpers" not in sys.modules and "conftest" not in sys.modules
