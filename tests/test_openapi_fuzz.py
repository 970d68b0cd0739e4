"""schemathesis over the schema a real server serves: no 5xx, every answer as documented.

The server runs on loopback with a loopback Hub and no other host allowed (public defaults
dropped), so no generated request leaves this machine. Each operation
gets ``max_examples`` generated cases; the checks are the conformance ones (status listed,
body matching its schema, declared content type) and schemathesis' not_a_server_error: no
5xx at all, since every upstream here answers (see ``served``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from conftest import RunningServer, make_settings

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402

CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[RunningServer]:
    """A server whose upstreams all answer: a loopback Hub that holds no repository (every
    repo id is a 404), and no other host allowed (every URL a 403). A generated request can
    then meet no upstream failure, so any 5xx is the server's own."""
    from hubserver import HubServer

    home = tmp_path_factory.mktemp("fuzz")
    with HubServer() as hub:
        settings_ = make_settings(
            home / "home",
            [],
            hf_endpoint=hub.base_url,
            hf_hub_cache=home / "no-hub-cache",
            fetch_retries=0,
            device="cpu",
            # No background import of torch: its numpy import raced hypothesis reading
            # numpy.ndarray in this process ("partially initialized module 'numpy'", one
            # run in two). Requests import the runtime while the fuzzer waits for them.
            warm_up=False,
        )
        server = RunningServer(settings_).start()
        yield server
        server.stop()


def fuzz_operation(operation, base_url: str, per_operation: int, mode) -> int:
    """Run up to ``per_operation`` generated cases against one operation; returns how many.
    ``mode``: valid data (positive) or data the schema forbids (negative, must be a 4xx)."""
    ran = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=per_operation,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report the first failure
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case) -> None:
        nonlocal ran
        ran += 1
        case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)

    fuzz()
    return ran


def run_fuzz(server: RunningServer, per_operation: int) -> dict[str, int]:
    """Fuzz every operation of the served schema, with valid and with invalid data; the cases
    run per operation and mode. Every one is fuzzed even when an earlier one fails, so one
    run shows every failure."""
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    counts: dict[str, int] = {}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation, mode in itertools.product(operations, list(GenerationMode)):
        label = f"{operation.label} [{mode.value}]"
        try:
            counts[label] = fuzz_operation(operation, server.base_url, per_operation, mode)
        except Unsatisfiable:
            # Nothing of this operation can be made invalid (no parameters, no body, or only
            # a free-form string path parameter): no negative case exists.
            assert mode is GenerationMode.NEGATIVE, label
        except BaseException as exc:  # a schemathesis FailureGroup: collect it, go on
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures.append(f"{label}: {exc}")
    assert not failures, "\n\n".join(failures)
    return counts


def report(counts: dict[str, int]) -> int:
    total = sum(counts.values())
    for label, count in sorted(counts.items()):
        print(f"{count:5d}  {label}")
    print(f"schemathesis: {total} cases over {len(counts)} operation x mode pairs")
    return total


def test_schema_fuzz_finds_no_server_error_or_undocumented_answer(served):
    counts = run_fuzz(served, per_operation=20)
    positive = [label for label in counts if label.endswith("[positive]")]
    assert len(positive) >= 17  # every operation of the schema was exercised
    assert len(counts) > len(positive)  # and invalid data was sent where it can be
    assert report(counts) >= 300


@pytest.mark.skipif(
    not os.environ.get("MODELHOST_FUZZ_LONG"),
    reason="by hand: MODELHOST_FUZZ_LONG=1 pytest tests/test_openapi_fuzz.py -k long -s",
)
def test_schema_fuzz_long(served):
    assert report(run_fuzz(served, per_operation=60)) >= 1000


def test_schema_documents_the_error_body_everywhere(tmp_path):
    """Every error status of every operation carries ErrorBody (FastAPI's own
    HTTPValidationError is gone), and names carry their pattern."""
    from modelhost.api.app import create_app
    from modelhost.names import NAME_PATTERN

    schema = create_app(make_settings(tmp_path, [])).openapi()
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components and "ValidationError" not in components
    assert components["ErrorBody"]["required"] == ["success", "message", "error"]
    assert components["ErrorBody"]["properties"]["success"]["const"] is False
    body_ref = {"$ref": "#/components/schemas/ErrorBody"}
    # The OpenAI-compatible routes answer in OpenAI's shape, and a malformed body with 400.
    openai_ref = {"$ref": "#/components/schemas/OpenAIErrorBody"}
    for path, operations in schema["paths"].items():
        openai = path.startswith("/v1/")
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            errors = {code: r for code, r in operation["responses"].items() if code >= "400"}
            assert "403" in errors, where  # the Host/Origin guard answers on every route
            if operation.get("parameters") or "requestBody" in operation:
                assert ("4XX" if openai else "422") in errors, where
            expected = openai_ref if openai else body_ref
            for code, response in errors.items():
                assert response["content"]["application/json"]["schema"] == expected, (where, code)
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "model_name":
                    assert parameter["schema"]["pattern"] == NAME_PATTERN.pattern, where
    name = components["DownloadRequest"]["properties"]["name"]
    assert name["pattern"] == NAME_PATTERN.pattern
