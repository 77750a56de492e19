"""API fuzz run: schemathesis makes requests from the service's own OpenAPI schema (/openapi.json) and
sends them to a real server; no answer may be a server error. Small for CI: a few dozen requests per
operation, the same ones on every run. (Driven through hypothesis directly: schemathesis's own pytest
parametrisation does not run under this pytest.)"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from conftest import API_KEY, ServerProcess
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def operations(server: ServerProcess) -> dict[str, object]:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        found[f"{operation.method.upper()} {operation.path}"] = operation
    return found


def test_the_schema_has_every_endpoint(operations: dict[str, object]) -> None:
    assert {"POST /detect", "GET /healthz", "GET /readyz", "GET /v1/models", "GET /metrics"} <= set(
        operations
    )


@pytest.mark.parametrize(
    "name", ["POST /detect", "GET /v1/models", "GET /healthz", "GET /readyz", "GET /metrics"]
)
def test_no_generated_request_gets_a_server_error(name: str, operations: dict, server: ServerProcess) -> None:
    statuses: Counter[int] = Counter()

    @given(case=operations[name].as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            base_url=server.url, headers={"X-API-Key": API_KEY}, checks=[not_a_server_error]
        )
        statuses[response.status_code] += 1

    run()
    assert sum(statuses.values()) >= 1 and max(statuses) < 500, statuses
