"""Property-based checks of the HTTP chat routes against their own OpenAPI description:
schemathesis generates requests from /openapi.json (valid ones, and for bodies invalid
ones too) and validates every answer on a live gateway — status documented, content type,
response schema, no server error, invalid data rejected.

The operations are driven through ``APIOperation.as_strategy()`` inside ordinary tests,
so the gateway comes from the usual fixtures (schemathesis's ``from_fixture`` loader
reads ``node._nodeid``, which this pytest no longer has).
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from chatgate.testing.servers import FakeLLM, RunningGateway

OPERATIONS = [
    pytest.param("POST", "/chat", id="POST /chat"),
    *(
        pytest.param("POST", path, id=f"POST {path}")
        for path in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/api/show")
    ),
    *(
        pytest.param("GET", path, id=f"GET {path}")
        for path in ("/v1/models", "/api/tags", "/api/version", "/api/ps", "/agents")
    ),
]
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            # Invalid data may also be too large (413); never a server error.
            "negative_data_rejection": {"expected-statuses": ["400", "401", "404", "413", "422"]},
            # A body that fits the schema may still be refused on meaning (the last message
            # must be the user's; an unknown model is 404): such a 4xx is a correct answer.
            "positive_data_acceptance": {"enabled": False},
        }
    }
)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_route_conforms_to_its_openapi_description(
    gw: RunningGateway, fake: FakeLLM, method: str, path: str
) -> None:
    fake.configure(tokens=5)
    schema = schemathesis.openapi.from_url(gw.url + "/openapi.json", config=CONFIG)
    operation = schema[path][method]
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if method == "POST" else [])
    cases = st.one_of(*(operation.as_strategy(mode) for mode in modes))

    @given(case=cases)
    @settings(
        max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def check(case: Any) -> None:
        case.call_and_validate()

    check()
