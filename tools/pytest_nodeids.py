"""A pytest plugin that runs only the tests named in a file (one node id a line), for device
visits that resume a suite cut short: ``-p pytest_nodeids --nodeids-file FILE`` (with tools/ on
PYTHONPATH). A line that names a test file (``tests/x/test_y.py``) selects every test in it.
Unlike node ids given on the command line, an id that does not exist in this checkout or torch
version (OpInfo variants differ between torch releases) is reported and skipped instead of
stopping the whole run before any test."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--nodeids-file", help="run only the tests whose node ids this file lists")


def pytest_collection_modifyitems(config, items):
    path = config.getoption("--nodeids-file")
    if not path:
        return
    with open(path) as f:
        wanted = {line.strip() for line in f if line.strip()}
    def names(item):  # the test's own id and its file's path
        return {item.nodeid, item.nodeid.split("::")[0]}

    keep = [item for item in items if names(item) & wanted]
    config.hook.pytest_deselected(items=[item for item in items if not names(item) & wanted])
    items[:] = keep
    missing = wanted.difference(*map(names, keep))
    if missing:
        print(f"pytest_nodeids: {len(missing)} of {len(wanted)} ids not collected here, e.g. "
              f"{sorted(missing)[0]}")
