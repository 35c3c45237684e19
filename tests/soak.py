"""`make soak`: the fault tests and the hostile corpus, repeated, with a table of figures.

A pytest plug-in (`-p tests.soak`), not a second harness: with MODELPRESS_SOAK_ROUNDS=N every test
of the soak modules runs N times (its module fixtures, the production stack among them, are built
once), and the end of the run prints what the issue asks for. Each test asserts the whole outcome
(status, code, a healthy server, nothing stored, no code run; the job done once, every artifact
matching its digest), so a passing test is a case or a fault with nothing lost; a failing one is
counted under the first figure its failure names.
"""

import os
import re
import sys
import time

import pytest

HOSTILE_MODULES = {"test_hostile_inputs", "test_pt2_archive"}
FAULT_MODULES = {"test_worker_faults", "test_redis_outage"}
# Tests of the hostile modules that inject an outage rather than a bad input.
FAULT_TESTS = {"test_a_database_outage_is_503_with_retry_after_and_service_returns"}
# The first pattern a failure's text matches names the figure it counts under.
HOSTILE_FAILURES = [("hangs", r"Timeout|timed out"), ("5xx", r"\b5\d\d\b"), ("code executed", r"code-ran|MARKER"),
                    ("files escaped", r"stored_objects|outside")]
FAULT_FAILURES = [("jobs stuck", r"Timeout|timed out|wait_finished|did not finish"), ("jobs corrupt", r"sha256|digest"),
                  ("jobs duplicated", r"attempts|sorted\(names\)"), ("jobs lost", r"worker_lost|succeeded"),
                  ("other failures", r".")]

figures: dict[str, int] = {}
started = time.monotonic()


def rounds() -> int:
    return max(1, int(os.environ.get("MODELPRESS_SOAK_ROUNDS", "1")))


def budget_s() -> float:
    """Seconds after which the tests not yet started are skipped (counted as not run), so the run
    ends by itself, with its table, inside `make soak`'s bound."""
    return float(os.environ.get("MODELPRESS_SOAK_BUDGET_S", "780"))


def pytest_runtest_setup(item):
    if time.monotonic() - started > budget_s():
        _count("not run (budget spent)")
        pytest.skip("the soak's time budget is spent")


def pytest_generate_tests(metafunc):
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if rounds() > 1 and module in HOSTILE_MODULES | FAULT_MODULES:
        metafunc.fixturenames.append("soak_round")
        metafunc.parametrize("soak_round", range(rounds()), ids=[f"round{r}" for r in range(rounds())])


def _count(name: str, n: int = 1) -> None:
    figures[name] = figures.get(name, 0) + n


def _first_match(text: str, patterns) -> str:
    return next(name for name, pattern in patterns if re.search(pattern, text))


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    test = report.nodeid.split("::")[-1].split("[")[0]
    if report.when != "call" and not (report.failed and report.when == "setup"):
        return
    failure = str(report.longrepr) if report.failed else ""
    if module in FAULT_MODULES or test in FAULT_TESTS:
        _count("faults injected")
        if failure:
            _count(_first_match(failure, FAULT_FAILURES))
    elif module in HOSTILE_MODULES:
        _count("cases tried")
        if failure:
            _count(next((name for name, pattern in HOSTILE_FAILURES if re.search(pattern, failure)), "other failures"))


def pytest_unconfigure(config):
    """Printed at the very end (also after an interrupt), straight to stdout."""
    names = ["cases tried", "5xx", "hangs", "code executed", "files escaped", "other failures",
             "faults injected", "jobs lost", "jobs stuck", "jobs duplicated", "jobs corrupt", "not run (budget spent)"]
    lines = [f"\nsoak: {rounds()} round(s), {time.monotonic() - started:.0f} s", "| figure | count |", "|---|---|"]
    lines += [f"| {name} | {figures.get(name, 0)} |" for name in names]
    sys.stdout.write("\n".join(lines) + "\n")
