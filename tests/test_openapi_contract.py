"""The OpenAPI document at /openapi.json is the API's contract: every status code, content type,
header and server-sent event the API answers with is documented there, and every bound it states
is the bound it enforces, in both dialects (charlstm's own and OpenAI's completions). A
schema-driven fuzzer (Schemathesis) drives every operation from the document itself, behind a real
HTTP server, and checks each answer against it."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, Self

import anyio.from_thread
import httpx
import jsonschema
import pytest

from charlstm.serve.app import ServerConfig, create_app
from tests.helpers import on_loopback
from tests.test_openai_compat import openai_events

KEY = "contract-test-key-0123456789"
# Small limits, so that the largest request the document allows is generated in a moment.
CONFIG = {
    "max_length": 30,
    "max_start_chars": 20,
    "max_num_samples": 3,
    "max_concurrency": 8,
    "max_body_bytes": 2048,
    "time_limit": 30.0,
}


class Live:
    """The app on an event loop of its own (its workers live there between requests), called
    synchronously as Hypothesis needs."""

    def __init__(self, app) -> None:
        self.app = app

    def __enter__(self) -> Self:
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        transport = httpx.ASGITransport(app=self.app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://localhost")
        return self

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        call = functools.partial(self.client.request, method, path, timeout=60, **kwargs)
        return self.portal.call(call)

    def __exit__(self, *exc: object) -> None:
        self.portal.call(self.client.aclose)
        self.portal.call(self.app.state.server.shutdown)
        self._portal_cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def live(trained_model) -> Iterator[Live]:
    with Live(create_app([trained_model], ServerConfig(**CONFIG, api_keys=(KEY,)))) as server:
        yield server


@pytest.fixture(scope="module")
def spec(live) -> dict:
    r = live.request("GET", "/openapi.json")
    assert r.status_code == 200
    return r.json()


def with_components(schema: dict, spec: dict) -> dict:
    """A schema of the document, made whole: its `#/components/...` references resolve."""
    return {**schema, "components": spec["components"]}


def operations(spec: dict) -> list[tuple[str, str, dict]]:
    return [(path, method, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


def resolve(schema: dict, spec: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def inline(schema: Any, spec: dict) -> Any:
    """`schema` with every reference replaced by what it names (the document has no cycles)."""
    if isinstance(schema, dict):
        return {k: inline(v, spec) for k, v in resolve(schema, spec).items()}
    if isinstance(schema, list):
        return [inline(v, spec) for v in schema]
    return schema


# --------------------------------------------------------------------------- checking an answer


def parse_events(text: str) -> list[tuple[str, Any]]:
    """The events of a whole SSE body; each must be one `event:` line and one `data:` line."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 2, block
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        events.append((lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])))
    return events


def check_events(text: str, schema: dict, spec: dict) -> None:
    """Each event of an SSE body, read as a client reads it ({"event": its name or "message",
    "data": its text}), fits the document's schema of one event, and its data, where that schema
    says it is JSON text, is JSON that fits the schema it names (`contentSchema`)."""
    for block in text.rstrip("\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        event = {"event": fields.get("event", "message"), "data": fields["data"]}
        jsonschema.validate(event, with_components(schema, spec))
        (branch,) = [
            b for b in schema["anyOf"] if b["properties"]["event"]["const"] == event["event"]
        ]
        data = branch["properties"]["data"]
        for option in data.get("anyOf", [data]):
            if "contentSchema" in option and event["data"] != "[DONE]":
                content = with_components(option["contentSchema"], spec)
                jsonschema.validate(json.loads(event["data"]), content)


def check_answer(spec: dict, path: str, method: str, r: httpx.Response) -> None:
    """`r` is an answer the document promises: no 5xx, a documented status, a documented content
    type whose schema the body fits, the documented headers, and for an event stream, documented
    events in their order, each event's data fitting its schema."""
    shown = f"{method.upper()} {path} -> {r.status_code}: {r.text[:300]}"
    assert r.status_code < 500, shown
    documented = spec["paths"][path][method]["responses"]
    assert str(r.status_code) in documented, shown
    answer = documented[str(r.status_code)]
    media_type = r.headers.get("content-type", "").split(";")[0]
    assert media_type in answer.get("content", {}), shown
    for header in answer.get("headers", {}):
        assert header in r.headers, (header, shown)
    if media_type == "application/json":
        schema = answer["content"][media_type]["schema"]
        jsonschema.validate(r.json(), with_components(schema, spec))
    if media_type == "text/event-stream":
        check_events(r.text, answer["content"][media_type]["schema"], spec)
    if media_type == "text/event-stream" and "x-sse-data" in answer:  # OpenAI's: data only
        events = openai_events(r.text)
        assert events[-1] == answer["x-sse-end"] or "error" in events[-1], events[-1]
        for data in events:
            if data != answer["x-sse-end"]:
                jsonschema.validate(data, with_components(answer["x-sse-data"], spec))
    elif media_type == "text/event-stream":
        events = parse_events(r.text)
        names = [name for name, _ in events]
        assert names[0] == "start" and names[-1] in ("done", "error"), names
        assert set(names[1:-1]) <= {"chunk"}, names
        for name, data in events:
            jsonschema.validate(data, with_components(answer["x-sse-events"][name], spec))


# ----------------------------------------------------------------------- what the document says


def test_every_operation_documents_the_answers_of_the_guard_and_the_transport(spec) -> None:
    """Host, key, content-type, size and deadline checks answer before any endpoint runs, so
    every operation lists them; the API needs the Bearer key, health and the docs do not."""
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    for path, method, op in operations(spec):
        codes = set(op["responses"])
        assert {"200", "400", "403", "413", "503"} <= codes, (path, codes)
        if path.startswith("/v1/"):
            assert "401" in codes and op["security"] == [{"apiKey": []}], path
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
        else:
            assert "401" not in codes and "security" not in op, path
        if method == "post":
            invalid = "400" if "openai" in op["tags"] else "422"  # OpenAI's bad request is 400
            assert {"408", "415", invalid, "429"} <= codes, path
            assert "Retry-After" in op["responses"]["429"]["headers"]


def test_the_openai_operations_document_only_openais_errors(spec) -> None:
    """Every JSON error of an OpenAI operation is OpenAI's error object (with charlstm's `detail`
    beside it on the shared GET /v1/models), and none documents a 422."""
    ops = [(path, op) for path, _, op in operations(spec) if "openai" in op["tags"]]
    assert {path for path, _ in ops} == {"/v1/completions", "/v1/models", "/v1/models/{model}"}
    for path, op in ops:
        assert "422" not in op["responses"], path
        for code, answer in op["responses"].items():
            if code.startswith(("4", "5")) and "application/json" in answer["content"]:
                schema = resolve(answer["content"]["application/json"]["schema"], spec)
                assert resolve(schema["properties"]["error"], spec)["required"] == [
                    "message",
                    "type",
                    "param",
                    "code",
                ], (path, code)
                assert ("detail" in schema["properties"]) == (path == "/v1/models"), path


def test_without_keys_no_key_is_documented(trained_model) -> None:
    spec = create_app([trained_model], ServerConfig()).openapi()
    assert "securitySchemes" not in spec["components"]
    assert all("401" not in op["responses"] for _, _, op in operations(spec))


def test_the_streams_errors_are_json_and_its_events_are_documented(spec) -> None:
    """Before the stream starts, a refusal is a JSON error like any other (not an event stream);
    the 200 answer lists each event's data by name, as components of the document."""
    op = spec["paths"]["/v1/generate/stream"]["post"]
    for code, answer in op["responses"].items():
        expected = {"text/event-stream"} if code == "200" else {"application/json"}
        if code == "503":
            expected = {"text/plain"}
        assert set(answer["content"]) == expected, code
    events = op["responses"]["200"]["x-sse-events"]
    assert set(events) == {"start", "chunk", "done", "error"}
    for ref in events.values():
        assert resolve(ref, spec)["type"] == "object"


def test_openais_answers_fit_the_document(spec, live) -> None:
    """A completion, streamed (with and without the usage chunk) or not, a refusal of each kind
    and the model listings: each is an answer the document describes, in its schema."""
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "run", "prompt": "a", "max_tokens": 5, "n": 2, "seed": 1}
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    for extra in ({}, {"stream": True}, usage, {"logprobs": 1}, {"model": "nope"}):
        r = live.request("POST", "/v1/completions", json={**body, **extra}, headers=auth)
        check_answer(spec, "/v1/completions", "post", r)
    r = live.request("POST", "/v1/completions", json=body)
    assert r.status_code == 401
    check_answer(spec, "/v1/completions", "post", r)
    for path, url in (("/v1/models", "/v1/models"), ("/v1/models/{model}", "/v1/models/run")):
        for headers in (auth, {}):
            check_answer(spec, path, "get", live.request("GET", url, headers=headers))
    r = live.request("GET", "/v1/models/nope", headers=auth)
    assert r.status_code == 404
    check_answer(spec, "/v1/models/{model}", "get", r)


def test_native_answers_fit_the_document(spec, live) -> None:
    """A generation whole and streamed (several samples, a stop rule), and a refusal: each is an
    answer the document describes, the stream's every event in the document's event schema."""
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"start_text": "a", "length": 20, "num_samples": 2, "seed": 3}
    for path in ("/v1/generate", "/v1/generate/stream"):
        for extra in ({}, {"stop": ["e"], "max_lines": 1}, {"length": 10**6}):
            r = live.request("POST", path, json={**body, **extra}, headers=auth)
            check_answer(spec, path, "post", r)


def test_limits_in_the_document_are_the_servers(spec, live) -> None:
    """The request schemas (both dialects') state the server's limits, the same as GET /v1/model
    lists."""
    props = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    limits = live.request("GET", "/v1/model", headers={"Authorization": f"Bearer {KEY}"}).json()
    limits = limits["limits"]
    assert props["length"]["maximum"] == limits["max_length"] == CONFIG["max_length"]
    assert props["start_text"]["maxLength"] == limits["max_start_chars"]
    assert props["num_samples"]["maximum"] == limits["max_num_samples"]
    completion = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert completion["max_tokens"]["anyOf"][0]["maximum"] == limits["max_length"]
    prompt = completion["prompt"]["anyOf"]  # a string, or a list of one
    assert prompt[0]["maxLength"] == prompt[1]["items"]["maxLength"] == limits["max_start_chars"]
    assert completion["n"]["anyOf"][0]["maximum"] == limits["max_num_samples"]
    assert (
        str(CONFIG["max_body_bytes"])
        in spec["paths"]["/v1/generate"]["post"]["responses"]["413"]["description"]
    )


# --------------------------------------------------------------------- every bound it enforces


def _bounds(schema: dict) -> Iterator[tuple[str, Any]]:
    """Every (keyword, value) bound in a property's schema, its anyOf branches included."""
    for keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "const"):
        if keyword in schema and isinstance(schema[keyword], int | float):
            yield keyword, schema[keyword]
    for keyword in ("minLength", "maxLength", "minItems", "maxItems"):
        if keyword in schema:
            yield keyword, schema[keyword]
    for branch in schema.get("anyOf", []):
        yield from _bounds(branch)


def _types(schema: dict) -> set[str]:
    types = {schema["type"]} if "type" in schema else set()
    for branch in schema.get("anyOf", []):
        types |= _types(branch)
    return types


def _candidates(schema: dict) -> list[Any]:
    """Values at, just inside and just past every bound the schema states."""
    types = _types(schema)
    values: list[Any] = []
    for keyword, bound in _bounds(schema):
        if keyword.endswith(("Length", "Items")):
            sizes = [n for n in (bound - 1, bound, bound + 1) if n >= 0]
            if "string" in types:
                values += ["a" * n for n in sizes]  # "a": a character the model knows
            if "array" in types:
                items = schema.get("items") or next(
                    b["items"] for b in schema["anyOf"] if "items" in b
                )
                item = next(v for v in _candidates(items) if _valid(v, items))
                values += [[item] * n for n in sizes]
            continue
        if "integer" in types:
            base = math.ceil(bound) if keyword in ("minimum", "exclusiveMaximum") else bound
            values += [int(base) - 1, int(base), int(base) + 1]
        if "number" in types:
            values += [bound, math.nextafter(bound, -math.inf), math.nextafter(bound, math.inf)]
    if "items" in schema and not values:
        values += [[v] for v in _candidates(schema["items"])]
    return values


def _valid(value: Any, schema: dict) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def _refused_fields(r: httpx.Response) -> set[str]:
    """The fields a refusal names: charlstm's 422 lists them, OpenAI's 400 names one `param`."""
    if r.status_code == 422:
        return {d["field"].split("[")[0] for d in r.json()["detail"]}
    if r.status_code == 400:
        return {r.json()["error"]["param"]}
    return set()


# Each request schema: the requests that send it (a path and what the body adds), a valid body to
# change one field of, the status of a refusal, and how many values the test must try at least.
DIALECTS = {
    "GenerateRequest": (
        [("/v1/generate", {}), ("/v1/generate/stream", {})],
        {"start_text": "a", "length": 3, "seed": 1},
        422,
        60,  # length, num_samples, start_text, temperature, top_p, seed, stop, ...
    ),
    "CompletionRequest": (
        [("/v1/completions", {}), ("/v1/completions", {"stream": True})],
        {"model": "run", "prompt": "a", "max_tokens": 3, "seed": 1},
        400,
        100,  # max_tokens, n, prompt, stop, the neutral-only parameters, ...
    ),
}


@pytest.mark.parametrize("request_schema", list(DIALECTS))
def test_every_bound_the_schema_states_is_the_bound_the_server_enforces(
    spec, live, request_schema
) -> None:
    """For each field of a request and each bound its schema states (minimum, maximum,
    exclusive ones, lengths, item counts, consts, including those inside anyOf), values at the
    bound and on either side of it are refused naming that field (charlstm's 422, OpenAI's 400)
    exactly when the schema says they are invalid, streamed or not."""
    sends, base, refusal, enough = DIALECTS[request_schema]
    request = spec["components"]["schemas"][request_schema]
    tried = 0
    for name, schema in request["properties"].items():
        for value in _candidates(schema):
            for path, extra in sends:
                r = live.request(
                    "POST",
                    path,
                    json={**base, **extra, name: value},
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                valid = _valid(value, schema)
                refused = r.status_code == refusal and name in _refused_fields(r)
                assert refused != valid, (name, value, valid, r.status_code, r.text[:300])
                assert r.status_code in ((200,) if valid else (refusal,)), (name, value, r.text)
                tried += 1
    assert tried >= enough


def test_the_server_refuses_exactly_the_requests_the_document_calls_invalid(spec, live) -> None:
    """What a fuzzer found the document and the server disagreeing on, by class: characters the
    model never saw (refused unless skipped, and a text of nothing else refused even then), the
    model by name, and integers written as 999.0 (JSON Schema's integers include them). For each
    body, the document's verdict (the request's schema) is the server's."""
    known = {"start_text": "a b"}
    native = [
        known,
        {"start_text": "a\u2603"},
        {"start_text": "a\u2603", "unknown": "skip"},
        {"start_text": "\u2603\u2604", "unknown": "skip"},
        {"start_text": "\ufeffa\r\nb"},  # a byte-order mark and CRLF, as the server reads them
        {**known, "model": "run"},
        {**known, "model": ""},
        {**known, "model": None},
        {**known, "model": "other"},
        {**known, "length": 3.0, "num_samples": 2.0, "seed": 5.0, "max_lines": 1.0},
        {**known, "length": 3.5},
        {**known, "length": True},
    ]
    openai = [
        {"model": "run", "prompt": "a b"},
        {"model": "run", "prompt": ["a b"]},
        {"model": "run", "prompt": "a\u2603"},
        {"model": "run", "prompt": ["\u2603"]},
        {"model": "run", "prompt": "a", "max_tokens": 3.0, "n": 2.0, "best_of": 1.0},
        {"model": "run", "prompt": "a", "max_tokens": 2.5},
    ]
    auth = {"Authorization": f"Bearer {KEY}"}
    for name, path, bodies, refusal in (
        ("GenerateRequest", "/v1/generate", native, 422),
        ("CompletionRequest", "/v1/completions", openai, 400),
    ):
        schema = with_components(spec["components"]["schemas"][name], spec)
        for body in bodies:
            r = live.request("POST", path, json={"seed": 1, **body}, headers=auth)
            valid = _valid({"seed": 1, **body}, schema)
            assert r.status_code == (200 if valid else refusal), (body, valid, r.text[:300])


def test_a_method_an_operation_does_not_have_is_405_with_allow(spec, live) -> None:
    """Whatever its body or content type, a method a path does not have is 405 naming the ones
    it has (it used to be 415 when it was a PUT without JSON); a path the API does not have is
    404."""
    auth = {"Authorization": f"Bearer {KEY}"}
    for path, method, _ in operations(spec):
        url = path.replace("{model}", "run")
        for other in {"GET", "POST", "PUT", "PATCH", "DELETE"} - {method.upper()}:
            r = live.request(other, url, headers=auth, content=b"x")
            assert r.status_code == 405, (other, url, r.status_code, r.text)
            assert r.headers["allow"] == method.upper(), (other, url)
            answer = r.json()
            reason = answer["error"]["message"] if "error" in answer else answer["detail"]
            assert reason == f"{other} is not a method of {url}; it takes {method.upper()}"
    assert live.request("PUT", "/v1/nothing", headers=auth).status_code == 404


def test_a_body_of_exactly_max_body_bytes_is_read_and_one_more_byte_is_413(live) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = json.dumps({"start_text": "a", "length": 3}).encode()
    limit = CONFIG["max_body_bytes"]
    at_limit = body + b" " * (limit - len(body))
    assert (
        live.request("POST", "/v1/generate", content=at_limit, headers=headers).status_code == 200
    )
    r = live.request("POST", "/v1/generate", content=at_limit + b" ", headers=headers)
    assert r.status_code == 413


# ---------------------------------------------------------------------------- the fuzzer


# Test cases per operation and phase in CI: enough for every phase to reach every operation, on
# both dialects, in well under a minute on 2 cores. Run by hand with far more (the report in
# docs/benchmarks.md): SCHEMATHESIS_EXAMPLES=300 pytest -k schemathesis
FUZZ_EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "15"))


@pytest.mark.slow  # about a thousand requests, some of them generating: about a minute
def test_schemathesis_finds_no_answer_the_document_does_not_promise(
    trained_model, tmp_path
) -> None:
    """Schemathesis, a schema-driven fuzzer, run as a user would run it against the served
    document: every phase (the document's examples, the boundaries of every schema, random valid
    and invalid requests, sequences of calls) and every check (no 5xx, documented statuses,
    content types, headers and schemas, the stream's events, valid data accepted and invalid data
    refused, 405 with Allow for a method an operation does not have, a key that is not ignored),
    on both dialects, with the key and the server's small limits. It draws new cases each run: a
    failure prints the seed and a curl command that reproduces it."""
    app = create_app([trained_model], ServerConfig(**CONFIG, api_keys=(KEY,)))
    with on_loopback(app) as (_, listener):
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        command = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json"]
        command += ["--checks", "all", "--phases", "examples,coverage,fuzzing,stateful"]
        command += ["--max-examples", str(FUZZ_EXAMPLES), "--generation-database", "none"]
        command += ["--header", f"Authorization: Bearer {KEY}", "--no-color", "--workers", "1"]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path
        )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    assert "No issues found" in report, report[-3000:]
