"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis) against a real
``bentoml serve``: every POST route, schema-valid (positive) and schema-violating (negative) requests, two
checks on every answer: no 5xx (``not_a_server_error``) and the answer matches the documented response schema
for its status (``response_schema_conformance``).

Generation is derandomized (Hypothesis' fixed seed per test), so a run is reproducible and a failure found
once is found again. Service bugs the fuzzer found and that are not fixed yet are listed in
:data:`KNOWN_BUGS` with the failing check: the test then ends as an xfail naming them, and fails outright on
any other failure, and also when a listed bug no longer shows (the fix landed: delete its entry).
"""

from __future__ import annotations

import collections
import time

import httpx
import pytest

from tests.e2e.test_server import bentoml_serve, server_env
from tests.integration.serving_model import ensure_model

schemathesis = pytest.importorskip("schemathesis", minversion="4.0")

from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure
from schemathesis.specs.openapi.checks import response_schema_conformance

pytestmark = pytest.mark.slow

POST_ROUTES = ["/feedback", "/model", "/predict", "/predict_image", "/reload", "/suspects"]
EXAMPLES_PER_MODE = 150  # per route and generation mode: 6 routes x 2 modes x 150 = 1800 cases at most
CHECKS = [not_a_server_error, response_schema_conformance]

# (route, check) -> what is wrong. Each was reproduced by hand against a real server; see docs/reliability.md.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    env = server_env(NOISEWISE_MODEL=ensure_model(), NOISEWISE_STORE_URL=f"sqlite:///{work / 'store.db'}",
                     NOISEWISE_RELOAD_INTERVAL_S="0", NOISEWISE_MONITOR_INTERVAL_S="0")
    with bentoml_serve("noisewise.services.service:Noisewise", env, work / "bentoml-serve.log") as url:
        yield url, schemathesis.openapi.from_url(f"{url}/docs.json")


CASES: collections.Counter = collections.Counter()


def fuzz(url: str, operation) -> tuple[int, dict[str, list[str]], collections.Counter]:
    """Run both generation modes against one operation; returns (cases, {check: [examples]}, statuses)."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    statuses: collections.Counter = collections.Counter()
    cases = 0
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            nonlocal cases
            cases += 1
            response = case.call(base_url=url, timeout=30)
            statuses[response.status_code] += 1
            try:
                case.validate_response(response, checks=CHECKS)
            except (Failure, BaseExceptionGroup) as group:
                failures = group.exceptions if isinstance(group, BaseExceptionGroup) else (group,)
                for failure in failures:
                    for check in getattr(failure, "checks", ()) or ("?",):
                        if check in {c.__name__ for c in CHECKS} and len(found[check]) < 3:
                            found[check].append(f"[{response.status_code}] {failure.title}: "
                                                f"{failure.message[:300]}\n  {case.as_curl_command()[:400]}")
                        elif check in {c.__name__ for c in CHECKS}:
                            found[check].append("")

        run()
    return cases, found, statuses


def test_documented_post_routes_are_the_fuzzed_ones(served):
    url, _ = served
    paths = httpx.get(f"{url}/docs.json", timeout=10).json()["paths"]
    assert sorted(p for p, methods in paths.items() if "post" in methods) == POST_ROUTES


@pytest.mark.parametrize("route", POST_ROUTES)
def test_fuzz_post_route(served, route):
    url, schema = served
    operation = schema["/" + route.lstrip("/")]["POST"]
    started = time.monotonic()
    cases, found, statuses = fuzz(url, operation)
    CASES[route] = cases
    print(f"\nfuzz POST {route}: {cases} cases in {time.monotonic() - started:.1f} s, statuses {dict(statuses)}, "
          f"failing checks {sorted(found)}; all routes so far: {sum(CASES.values())} cases")
    assert cases >= 2, f"{route}: schemathesis generated {cases} cases"
    unexpected = {check: [e for e in examples if e][:3] for check, examples in found.items()
                  if (route, check) not in KNOWN_BUGS}
    assert not unexpected, f"POST {route}: " + "\n".join(f"{c}:\n" + "\n".join(e) for c, e in unexpected.items())
    known = {check for (r, check) in KNOWN_BUGS if r == route}
    fixed = known - set(found)
    assert not fixed, f"POST {route}: {sorted(fixed)} passes now: remove it from KNOWN_BUGS"
    if known:
        pytest.xfail("; ".join(f"{c} ({len(found[c])} cases): {KNOWN_BUGS[route, c]}" for c in sorted(known)))
