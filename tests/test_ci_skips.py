"""tests/conftest.py's CI hooks, in inner pytest sessions (pytester): under CI=true a skip fails the run
unless its reason says it needs CUDA; without CI a skip stays a skip. Both kinds of skip: in a test
(pytest.skip, a skip/skipif mark, a skipping fixture) and at collection (a module-level importorskip)."""

from __future__ import annotations

import pytest

# The inner sessions run in this process, in a temporary directory: their conftest takes the hooks
# from ours (tests.conftest is imported already).
HOOKS = "from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n"

IN_TESTS = """
import pytest

def test_skip_in_the_test():
    pytest.skip("shared data not found at /nowhere")

def test_skip_that_needs_cuda():
    pytest.skip("needs CUDA")

@pytest.mark.skipif(True, reason="no chromium here")
def test_skipif_mark():
    pass

@pytest.fixture
def browser():
    pytest.skip("no browser fixture")

def test_skip_in_a_fixture(browser):
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_xfail_is_not_a_skip():
    assert False

def test_passes():
    pass
"""

AT_COLLECTION = {
    "test_needs_a_package": """
import pytest
pytest.importorskip("modernlm_no_such_package")

def test_never_runs():
    pass
""",
    "test_needs_cuda_module": """
import pytest
pytest.skip("needs CUDA (the whole module)", allow_module_level=True)
""",
    "test_plain": """
def test_passes():
    pass
""",
}


@pytest.fixture
def inner(pytester, monkeypatch):
    pytester.makeconftest(HOOKS)
    return pytester


def test_under_ci_a_skip_fails_the_run_unless_it_needs_cuda(inner, monkeypatch):
    monkeypatch.setenv("CI", "true")
    inner.makepyfile(IN_TESTS)
    result = inner.runpytest("-rA")
    # a skip in the test body fails it; one in setup (a mark, a fixture) is an error in setup
    result.assert_outcomes(passed=1, failed=1, errors=2, skipped=1, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    for line in (
        "FAILED *::test_skip_in_the_test - skipped under CI=true, which fails the run: shared data not found at "
        "/nowhere (*.py:4)",
        "ERROR *::test_skipif_mark - skipped under CI=true, which fails the run: no chromium here (*.py:9)",
        "ERROR *::test_skip_in_a_fixture - skipped under CI=true, which fails the run: no browser fixture (*.py:17)",
        "SKIPPED [[]1] *.py:7: needs CUDA",
    ):
        result.stdout.fnmatch_lines([line])
    reports = result.reprec.getreports("pytest_runtest_logreport")
    skipped = [r.nodeid.split("::")[-1] for r in reports if r.skipped and not hasattr(r, "wasxfail")]
    assert skipped == ["test_skip_that_needs_cuda"]


def test_under_ci_a_module_level_importorskip_fails_at_collection(inner, monkeypatch):
    monkeypatch.setenv("CI", "true")
    inner.makepyfile(**AT_COLLECTION)
    result = inner.runpytest("-rA")
    assert result.ret == pytest.ExitCode.INTERRUPTED  # a collection error stops the session
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting test_needs_a_package.py*",
            "*skipped under CI=true, which fails the run: could not import 'modernlm_no_such_package'*",
        ],
        consecutive=False,
    )
    result.stdout.no_fnmatch_line("*ERROR collecting test_needs_cuda_module.py*")
    collected = {r.nodeid: r.outcome for r in result.reprec.getreports("pytest_collectreport")}
    assert collected["test_needs_a_package.py"] == "failed"
    assert collected["test_needs_cuda_module.py"] == "skipped"


@pytest.mark.parametrize("ci", [None, "", "false"], ids=["unset", "empty", "false"])
def test_without_ci_skips_stay_skips(inner, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    inner.makepyfile(IN_TESTS)
    inner.makepyfile(**AT_COLLECTION)
    result = inner.runpytest("-rA")
    result.assert_outcomes(passed=2, skipped=6, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
    assert "CI=true" not in result.stdout.str()
