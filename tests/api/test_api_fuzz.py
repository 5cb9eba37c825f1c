"""Schemathesis over every route, in process against the ASGI app on PostgreSQL: no input is a server error.

Bounded: a fixed number of derandomised examples per route and mode (inputs the schema allows, and inputs it
refuses), so each run tries the same inputs and takes the same few seconds. Schemathesis's own pytest
plugin is not used (its lazy fixture loading does not run under pytest 9); its strategies are driven by
Hypothesis directly.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.api.conftest import make_caller

EXAMPLES_PER_ROUTE = 25
# The rerank routes of other APIs answer errors in the shape those APIs' clients parse (Cohere's, TEI's).
OTHER_APIS_ERRORS = {"/v2/rerank": {"message"}, "/v1/rerank": {"message"}, "/rerank": {"error", "error_type"}}


@pytest.fixture(scope="module")
def fuzz_headers(client, settings):
    """A tenant of the fuzzer's own, so that authenticated routes are reached past their 401."""
    return make_caller(settings, "fuzzer").headers


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_route_answers_a_server_error(client, fuzz_headers, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, "every route is in the schema"
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_ROUTE,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case):
            response = case.call(headers=fuzz_headers)
            assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
            if response.status_code >= 400:
                body = response.json()
                if case.operation.path in OTHER_APIS_ERRORS:
                    assert set(body) == OTHER_APIS_ERRORS[case.operation.path], response.text[:500]
                else:
                    assert set(body["error"]) == {"code", "message", "param"}, response.text[:500]

        try:
            call()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE, operation.label  # a route with no input to get wrong
