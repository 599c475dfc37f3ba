"""The OpenAPI document at /openapi.json is the API's contract: every status code, content type,
header and server-sent event the API answers with is documented there, and every bound it states
is the bound it enforces, in both dialects (charlstm's own and OpenAI's completions). A
property-based test drives every operation from the document itself (valid bodies drawn from its
schemas, and hostile ones), in-process through the ASGI app, and checks each answer against the
document."""

from __future__ import annotations

import functools
import json
import math
import string
from collections.abc import Iterator
from typing import Any, Self

import anyio.from_thread
import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charlstm.serve.app import ServerConfig, create_app
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
    elif media_type == "text/event-stream" and "x-sse-data" in answer:  # OpenAI's: data only
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


# -------------------------------------------------------------------------- the property test


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values a JSON schema of this document allows: the keywords its request schemas use (type,
    the numeric bounds, lengths, item counts, enum, const, anyOf, object properties). A keyword
    it does not know fails the test, so that a new one is not silently ignored."""
    known = {"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength"}
    known |= {"maxLength", "minItems", "maxItems", "items", "enum", "const", "anyOf", "default"}
    known |= {"properties", "additionalProperties", "required", "title", "description"}
    assert set(schema) <= known, set(schema) - known
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return st.one_of([from_schema({**rest, **branch}) for branch in schema["anyOf"]]).filter(
            lambda v: _valid(v, schema)
        )
    kind = schema.get("type")
    if kind == "object":
        props = {k: from_schema(v) for k, v in schema.get("properties", {}).items()}
        required = {k: props.pop(k) for k in schema.get("required", [])}
        return st.fixed_dictionaries(required, optional=props)
    if kind == "array":
        return st.lists(
            from_schema(schema["items"]),
            min_size=schema.get("minItems", 0),
            max_size=schema.get("maxItems", 10),
        )
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 30))
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if kind == "integer":
        if low is not None:
            low = math.floor(low) + 1 if "exclusiveMinimum" in schema else math.ceil(low)
        if high is not None:
            high = math.ceil(high) - 1 if "exclusiveMaximum" in schema else math.floor(high)
        return st.integers(min_value=low, max_value=high)
    assert kind == "number", schema
    return st.floats(
        min_value=low,
        max_value=high,
        exclude_min="exclusiveMinimum" in schema,
        exclude_max="exclusiveMaximum" in schema,
        allow_nan=False,
        allow_infinity=False,
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)


@st.composite
def generate_request(draw, spec: dict, op: dict, vocabulary: str, model: str) -> dict[str, Any]:
    """A request for a generate or completions endpoint: mostly bodies the schema allows (half of
    them with a text the model knows, and the served model, so that they are generated), else
    hostile ones."""
    schema = inline(op["requestBody"]["content"]["application/json"]["schema"], spec)
    props = list(schema["properties"])
    kind = draw(st.sampled_from(["valid", "known", "known", "fields", "json", "bytes", "type"]))
    if kind in ("valid", "known"):
        body = draw(from_schema(schema))
        if kind == "known" and "prompt" in props:  # OpenAI's completions
            body["prompt"] = draw(st.text(alphabet=vocabulary, min_size=1, max_size=20))
            body["model"] = model
        elif kind == "known":
            body["start_text"] = draw(st.text(alphabet=vocabulary, min_size=1, max_size=20))
            body["unknown"] = draw(st.sampled_from(["error", "skip"]))
            body.pop("model", None)
        content = json.dumps(body).encode()
    elif kind == "fields":  # the right names with any values, and stray names
        body = draw(st.dictionaries(st.sampled_from(props) | st.text(max_size=8), JSON, max_size=5))
        content = json.dumps(body).encode()
    elif kind == "json":
        content = json.dumps(draw(JSON)).encode()
    else:
        content = draw(st.binary(max_size=200))
    content_type = "application/json"
    if kind == "type":
        content_type = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded"]))
    return {"content": content, "headers": {"Content-Type": content_type}}


@pytest.mark.slow  # a few hundred requests, some of them generating
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_the_api_driven_from_its_own_schema_gives_only_documented_answers(
    data, spec, live, trained_model
) -> None:
    """Any operation of the document, any request its schemas allow or a hostile one, with the
    key, a wrong one or none: never a 5xx, and always an answer the document describes."""
    path, method, op = data.draw(st.sampled_from(operations(spec)), label="operation")
    key = data.draw(st.sampled_from([KEY, KEY, KEY, "wrong-key-0123456789", None]), label="key")
    kwargs: dict[str, Any] = {"headers": {}}
    if "requestBody" in op:
        vocabulary = "".join(trained_model.vocab.chars)
        kwargs = data.draw(
            generate_request(spec, op, vocabulary, trained_model.name), label="request"
        )
    url = path
    for param in op.get("parameters", []):
        if param["in"] == "path":  # the served model, or a name it does not have
            name = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1)
            value = data.draw(st.just(trained_model.name) | name, label=param["name"])
            url = url.replace("{" + param["name"] + "}", value)
        if param["in"] == "query" and data.draw(st.booleans(), label=f"send {param['name']}"):
            value = data.draw(from_schema(param["schema"]) | st.just("run"), label=param["name"])
            if value is not None:
                kwargs["params"] = {param["name"]: value}
    if key is not None:
        kwargs["headers"]["Authorization"] = f"Bearer {key}"
    r = live.request(method.upper(), url, **kwargs)
    check_answer(spec, path, method, r)
