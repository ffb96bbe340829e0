import os

import pytest
import torch

import seeding

# Triton kernels run on CPU tensors through the interpreter when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def no_tf32():
    """TF32 off for one test; the global settings are restored after it (even when it fails)."""
    from kernel_harness import tf32_disabled

    with tf32_disabled():
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------ seeds in failure reports (seeding.py)

_FIXTURE_SEEDS: dict[int, list[tuple[str, int]]] = {}  # id(fixturedef) -> seeds drawn by its last set-up


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    start = seeding.mark()
    yield
    _FIXTURE_SEEDS[id(fixturedef)] = seeding.since(start)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item.stash[_START] = seeding.mark()
    yield


_START = pytest.StashKey[int]()


def _item_seeds(item) -> list[tuple[str, int]]:
    """Seeds of the fixtures this test uses (whenever they were set up), then those drawn by the test."""
    seeds: list[tuple[str, int]] = []
    info = getattr(item, "_fixtureinfo", None)
    for defs in info.name2fixturedefs.values() if info is not None else ():
        for d in defs:
            seeds += _FIXTURE_SEEDS.get(id(d), [])
    seeds += seeding.since(item.stash.get(_START, seeding.mark()))
    return list(dict.fromkeys(seeds))  # de-duplicated, in order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    seeds = _item_seeds(item)
    if not seeds:
        return
    text = seeding.describe(seeds)
    if hasattr(report.longrepr, "addsection"):
        report.longrepr.addsection("random seeds", text)
    else:
        report.sections.append(("random seeds", text))


# ------------------------------------------------------------------ tables a test wants shown

_SUMMARIES: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    """A test's ``record_property("terminal_summary", text)`` is printed after the run (reports
    carry their properties from pytest-xdist workers too, where a test's own print is lost)."""
    if report.when == "call":
        _SUMMARIES.extend((report.nodeid, v) for k, v in report.user_properties if k == "terminal_summary")


def pytest_terminal_summary(terminalreporter):
    for nodeid, text in _SUMMARIES:
        terminalreporter.section(nodeid)
        terminalreporter.write_line(text)
