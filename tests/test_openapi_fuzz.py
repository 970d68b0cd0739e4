"""schemathesis over the schema a real server serves, with every check (`--checks all`).

The server runs on loopback with a loopback Hub and no other host allowed (public defaults
dropped), so no generated request leaves this machine. schemathesis' own runner (``st run``)
drives it, as a user would run it: the examples, coverage and fuzzing phases, each operation
with a bounded number of generated cases, and all of its checks: no 5xx, every status,
content type, header and body as documented, schema-valid data accepted and invalid data
refused, ``405`` with an ``Allow`` header for undeclared methods, and ``Allow`` (on
``OPTIONS``) listing exactly the declared methods. The seed is fixed so a CI failure
reproduces (``MODELHOST_FUZZ_SEED`` draws others); ``MODELHOST_FUZZ_LONG=1`` runs 1,000+
cases by hand.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import RunningServer, make_settings

schemathesis = pytest.importorskip("schemathesis")

CI_EXAMPLES = 5  # per operation and phase: about as long as the suite's fuzz took before
LONG_EXAMPLES = 60
PHASES = "examples,coverage,fuzzing"  # stateful needs links the schema does not declare
# The all-jobs event stream never ends by design (it is a live feed): a fuzzer reading it
# waits out its request timeout for every case (two cases took a minute of the run).
# tests/test_events.py covers it; a job's own stream ends with the job and stays in.
ENDLESS_STREAMS = ("/events",)


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
        server.report_dir = home  # schemathesis' report folder goes here, not in the checkout
        yield server
        server.stop()


def run_schemathesis(server: RunningServer, examples: int, seed: str) -> tuple[int, str]:
    """``st run --checks all`` against the served schema; its exit status and output."""
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{server.base_url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        PHASES,
        "--max-examples",
        str(examples),
        "--seed",
        seed,
        "--workers",
        "1",
        "--no-shrink",
        "--request-timeout",
        "30",
        *(arg for path in ENDLESS_STREAMS for arg in ("--exclude-path", path)),
    ]
    env = {**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""}
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, cwd=server.report_dir
    )
    return done.returncode, done.stdout + done.stderr


def generated(output: str) -> int:
    """How many cases the run generated (its summary's ``N generated``)."""
    found = re.search(r"(\d+) generated", output)
    assert found, output[-3000:]
    return int(found.group(1))


def fuzz(server: RunningServer, examples: int) -> int:
    """Run every phase with every check; fails with schemathesis' report on any failure."""
    seed = os.environ.get("MODELHOST_FUZZ_SEED", "19")
    status, output = run_schemathesis(server, examples, seed)
    assert status == 0, output[-20000:]
    cases = generated(output)
    print(f"schemathesis --checks all: {cases} cases, seed {seed}, no failure")
    return cases


def test_schema_fuzz_with_every_check_finds_no_failure(served):
    """Fails before this change: positive data rejected (names without their pattern,
    keep_alive, seed past what a JSON double holds, /models/manage's required model_name
    validated as 'Ellipsis...', cross-field rules of /models/download), 405s whose Allow
    header listed one route's methods of several."""
    assert fuzz(served, CI_EXAMPLES) >= 500


@pytest.mark.skipif(
    not os.environ.get("MODELHOST_FUZZ_LONG"),
    reason="by hand: MODELHOST_FUZZ_LONG=1 pytest tests/test_openapi_fuzz.py -k long -s",
)
def test_schema_fuzz_long(served):
    assert fuzz(served, LONG_EXAMPLES) >= 1000


def test_schema_documents_the_error_body_everywhere(tmp_path):
    """Every error status of every operation carries ErrorBody (FastAPI's own
    HTTPValidationError is gone), and names carry their pattern."""
    from modelhost.api.app import create_app
    from modelhost.names import NAME_SCHEMA_PATTERN

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
                if parameter["name"] in ("model_name", "model"):
                    assert parameter["schema"]["pattern"] == NAME_SCHEMA_PATTERN, where
                    assert parameter["required"] is True, where
    name = components["DownloadRequest"]["properties"]["name"]
    assert name["pattern"] == NAME_SCHEMA_PATTERN


def test_schema_states_what_the_server_enforces(tmp_path):
    """Fails before: names in /v1 bodies and queries had no pattern, /models/manage's
    model_name was optional (its default was Ellipsis), seeds went negative and past what a
    JSON double holds, keep_alive and the batch settings had no type."""
    from modelhost.api.app import create_app
    from modelhost.errors import InvalidName
    from modelhost.names import NAME_PATTERN, NAME_SCHEMA_PATTERN, validate_name

    schema = create_app(make_settings(tmp_path, [])).openapi()
    components = schema["components"]["schemas"]
    manage = schema["paths"]["/models/manage"]["post"]["parameters"]
    assert {p["name"]: p["required"] for p in manage if p["name"] in ("action", "model_name")} == {
        "action": True,
        "model_name": True,
    }
    for model, field in (("SynthesizeRequest", "model_name"), ("SpeechRequest", "model"),
                         ("EmbeddingsRequest", "model")):  # fmt: skip
        assert components[model]["properties"][field]["pattern"] == NAME_SCHEMA_PATTERN, model
    for model in ("SynthesizeRequest", "SpeechRequest"):
        seed = components[model]["properties"]["seed"]["anyOf"][0]
        assert (seed["minimum"], seed["maximum"]) == (0, 2**53 - 1), model
    load = components["LoadRequest"]["properties"]
    assert load["max_batch_delay_ms"]["anyOf"][0] == {
        "type": "number",
        "minimum": 0,
        "maximum": 1000,
    }
    assert load["keep_alive"]["anyOf"][0] == {"type": "number"}
    # The schema's name pattern is validate_name's rule exactly ('..' included).
    for name in ("a", "a.b", "a..b", "-a", "a" * 128, "a" * 129, "a/b"):
        try:
            valid = validate_name(name) == name
        except InvalidName:
            valid = False
        assert bool(re.fullmatch(NAME_SCHEMA_PATTERN, name)) is valid, name
    assert NAME_PATTERN.pattern != NAME_SCHEMA_PATTERN  # pydantic's engine has no lookahead


def test_405_and_options_list_every_method_of_the_path(served):
    """Fails before: Starlette's 405 named only the first matching route's methods (FastAPI
    makes one route per method), so a path with GET and POST answered Allow: GET, HEAD."""
    import httpx

    for path, methods in (("/v1/audio/speech/jobs", {"GET", "POST"}),
                          ("/v1/audio/speech/jobs/x", {"GET", "DELETE"})):  # fmt: skip
        for method in ("OPTIONS", "PUT", "PATCH"):
            answer = httpx.request(method, served.base_url + path)
            assert answer.status_code == 405, (method, path)
            allowed = {m.strip() for m in answer.headers["allow"].split(",")} - {"HEAD"}
            assert allowed == methods, (method, path, answer.headers["allow"])
