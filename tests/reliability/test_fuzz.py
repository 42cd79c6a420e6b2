"""Fuzz the HTTP API of a live `python -m backend serve` (embedded, tiny checkpoint) on loopback.

Schemathesis 4 generates requests from the server's own OpenAPI schema (valid and invalid bodies); Hypothesis adds
arbitrary JSON documents and raw bytes. Property: never a 5xx, always a JSON body, and no request hangs (every call
has a client timeout well below LS's 100 s). Example counts are bounded so the module stays under a minute or two.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.backend.ls_payloads import LABEL_CONFIG

pytestmark = pytest.mark.slow

EXAMPLES = 25
CALL_TIMEOUT = 30.0
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(start_server, model_env):
    # no allowed media hosts and no LS: any image URL the fuzzer invents is refused at once instead of downloaded
    return start_server({**model_env, "MEDIA_ALLOWED_HOSTS": "", "MEDIA_TIMEOUT": "2", "PREDICT_TIMEOUT": "20"})


@pytest.fixture(scope="module")
def operations(server) -> dict[tuple[str, str], object]:
    """The server's API operations, read from its live /openapi.json."""
    loaded = schemathesis.openapi.from_url(server.url + "/openapi.json")
    return {(op.method.upper(), op.path): op for op in (result.ok() for result in loaded.get_all_operations())}


def assert_sane(response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    kind = response.headers.get("content-type", "")
    kind = kind[0] if isinstance(kind, list) and kind else kind  # schemathesis' Response: header -> list of values
    if str(kind).startswith("application/json"):
        body = response.json()
        if response.status_code >= 400:
            assert set(body) == {"error", "message", "field"} and "Traceback" not in body["message"], body


# schemathesis' own pytest plugin does not load under this pytest; its strategies are driven by Hypothesis directly
WITH_BODY = [("POST", "/setup"), ("POST", "/predict")]  # bodies declared in the schema: valid and invalid ones
# /webhook and /jobs/prelabel read their raw body (fuzzed below); GETs and a string path parameter: nothing to negate
OTHERS = [("POST", "/webhook"), ("POST", "/jobs/prelabel"), ("GET", "/jobs/{job_id}"), ("GET", "/health"),
          ("GET", "/versions"), ("GET", "/metrics")]


@pytest.mark.parametrize("operation, mode", [(op, GenerationMode.POSITIVE) for op in WITH_BODY + OTHERS]
                         + [(op, GenerationMode.NEGATIVE) for op in WITH_BODY])
def test_schema_generated_requests_never_give_a_5xx(server, operations, operation, mode):
    assert operation in operations, f"{operation} is not in the OpenAPI schema: {sorted(operations)}"

    @FUZZ_SETTINGS
    @given(case=operations[operation].as_strategy(generation_mode=mode))
    def run(case) -> None:
        assert_sane(case.call(base_url=server.url, timeout=CALL_TIMEOUT))

    run()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25)

# LS-shaped bodies with fuzzed parts: the shape reaches deep into prompt resolution and label-config handling
tasks = st.lists(st.fixed_dictionaries({"id": json_values, "data": st.dictionaries(
    st.sampled_from(["image", "prompt", "text", "label"]), json_values, max_size=4)}), min_size=1, max_size=4)
predict_bodies = st.fixed_dictionaries({
    "tasks": tasks | json_values,
    "label_config": st.sampled_from([LABEL_CONFIG, "<View/>", "<View><BrushLabels name='t' toName='i'/></View>",
                                     "<<<", ""]) | json_values,
    "params": st.fixed_dictionaries({"context": json_values}) | json_values,
    "project": json_values})


@FUZZ_SETTINGS
@given(body=predict_bodies)
def test_ls_shaped_predict_bodies_never_give_a_5xx(server, body):
    assert_sane(httpx.post(server.url + "/predict", json=body, timeout=CALL_TIMEOUT))


@FUZZ_SETTINGS
@given(path=st.sampled_from(["/predict", "/setup", "/webhook", "/jobs/prelabel"]), raw=st.binary(max_size=300) | json_values.map(
    lambda value: json.dumps(value).encode()))
def test_arbitrary_bytes_and_json_never_give_a_5xx(server, path, raw):
    response = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"},
                          timeout=CALL_TIMEOUT)
    assert_sane(response)


def test_server_is_still_healthy_after_fuzzing(server):
    assert httpx.get(server.url + "/health", timeout=2).json()["status"] == "UP"
    assert "Traceback" not in server.log(), server.log()[-3000:]
