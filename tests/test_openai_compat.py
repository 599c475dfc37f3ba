"""OpenAI's completions dialect of `charlstm serve` (serve/openai_compat.py): its shapes, that it
generates through the native machinery (the same seed gives the native API's text), and that every
error on its paths comes in OpenAI's shape. In-process through the ASGI app, then with the official
`openai` client against a real `charlstm serve` process on loopback."""

from __future__ import annotations

import json
import re
import subprocess
import time
from typing import Any

import httpx
import pytest

from tests.helpers import charlstm_cmd, subprocess_env
from tests.test_server_security import bearer, call, run, serving

KEY = "openai-dialect-key-0123456789"
MODEL = "run"  # the name of the shared `trained_run`
PROMPT = "Shall I "  # characters the tiny model knows


def complete(trained_model, body: dict, config: dict | None = None, **kw) -> httpx.Response:
    return call(
        trained_model, "POST", "/v1/completions", config, json={"model": MODEL, **body}, **kw
    )


def openai_events(text: str) -> list[Any]:
    """The `data:` payloads of an OpenAI event stream, parsed ("[DONE]" as the string); each
    event must be that one line."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def joined(events: list[Any]) -> dict[int, str]:
    """Each choice's text, from its chunks."""
    texts: dict[int, str] = {}
    for event in events:
        if isinstance(event, dict):
            for c in event.get("choices", []):
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    return texts


def assert_openai_error(r: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    """`r` is an error in OpenAI's shape; returns its `error` object."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


# --------------------------------------------------------------------------------- the answers


def test_a_completion_has_openais_shape_and_counts_characters(trained_model) -> None:
    """A completion is OpenAI's text_completion object; max_tokens is characters, and usage counts
    the prompt once and the generated characters."""
    r = complete(trained_model, {"prompt": PROMPT, "max_tokens": 25, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert re.fullmatch(r"cmpl-[0-9a-f]{24}", body["id"])
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert abs(body["created"] - time.time()) < 60
    [choice] = body["choices"]
    assert choice == {
        "text": choice["text"],
        "index": 0,
        "logprobs": None,
        "finish_reason": "length",
    }
    assert len(choice["text"]) == 25
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 25, "total_tokens": 33}


def test_choices_are_the_native_samples_of_the_same_seed(trained_model) -> None:
    """n choices are n streams of the native engine: with the same seed, choice i is the native
    API's sample i; greedy (temperature 0) is the native greedy text; top_p is its nucleus."""
    for settings in (
        {"temperature": 1.0, "seed": 11},
        {"temperature": 0},
        {"temperature": 0.8, "top_p": 0.5, "seed": 4},
    ):
        mine = complete(trained_model, {"prompt": PROMPT, "max_tokens": 30, "n": 3, **settings})
        native = call(
            trained_model,
            "POST",
            "/v1/generate",
            json={"start_text": PROMPT, "length": 30, "num_samples": 3, **settings},
        )
        samples = [s.removeprefix(PROMPT) for s in native.json()["samples"]]
        assert [c["text"] for c in mine.json()["choices"]] == samples, settings
        assert [c["index"] for c in mine.json()["choices"]] == [0, 1, 2]
    other = complete(trained_model, {"prompt": PROMPT, "max_tokens": 30, "seed": 12})
    assert other.json()["choices"][0]["text"] != samples[0]


def test_a_stream_joins_to_the_same_text_and_ends_with_done(trained_model) -> None:
    """Streamed, each event is a text_completion chunk of one choice; a choice's chunks join to
    the text the plain request gives with the same seed, its last one carries its finish_reason,
    and [DONE] ends the stream. With include_usage a last chunk, with no choices, has the usage."""
    body = {"prompt": PROMPT, "max_tokens": 40, "n": 2, "seed": 9, "stop": ["e\n", "ro"]}
    whole = complete(trained_model, body).json()

    async def go():
        async with serving(trained_model) as (app, client):
            r = await client.post(
                "/v1/completions",
                json={"model": MODEL, **body, "stream": True},
            )
            plain = openai_events(r.text)
            options = {"include_usage": True}
            r = await client.post(
                "/v1/completions",
                json={"model": MODEL, **body, "stream": True, "stream_options": options},
            )
            assert app.state.server.used == 0  # the slots are free again
            return r, plain, openai_events(r.text)

    r, plain, with_usage = run(go())
    assert r.headers["content-type"].startswith("text/event-stream")
    for events in (plain, with_usage):
        assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
        assert joined(events) == {c["index"]: c["text"] for c in whole["choices"]}
        for event in events[:-1]:
            assert event["object"] == "text_completion" and event["model"] == MODEL
            assert event["id"].startswith("cmpl-") and event["id"] == events[0]["id"]
        pieces = [e["choices"][0] for e in events[:-1] if e["choices"]]
        assert all(len(e["choices"]) == 1 for e in events[:-1] if e["choices"])
        for choice in whole["choices"]:
            mine = [p for p in pieces if p["index"] == choice["index"]]
            assert [p["finish_reason"] for p in mine[:-1]] == [None] * (len(mine) - 1)
            assert mine[-1]["finish_reason"] == choice["finish_reason"]
    assert all("usage" not in e for e in plain[:-1])
    assert with_usage[-2]["choices"] == [] and with_usage[-2]["usage"] == whole["usage"]
    assert all(e["usage"] is None for e in with_usage[:-2])


def test_stop_ends_a_choice_before_the_stop_string(trained_model) -> None:
    """A stop string (or up to 4) ends a choice before it: the text excludes it and finish_reason
    is stop, as OpenAI's do; a stop the text never reaches leaves it at length."""
    free = complete(trained_model, {"prompt": PROMPT, "max_tokens": 40, "seed": 5})
    text = free.json()["choices"][0]["text"]
    stop = text[12:14]
    expected = text[: text.find(stop)]
    for given in (stop, [stop], ["\x00never", stop, "Ω", "zzzz"]):
        r = complete(trained_model, {"prompt": PROMPT, "max_tokens": 40, "seed": 5, "stop": given})
        [choice] = r.json()["choices"]
        assert (choice["text"], choice["finish_reason"]) == (expected, "stop"), given
        assert r.json()["usage"]["completion_tokens"] == len(expected)
    r = complete(trained_model, {"prompt": PROMPT, "max_tokens": 40, "seed": 5, "stop": "\x00"})
    assert r.json()["choices"][0] == free.json()["choices"][0]


def test_echo_begins_each_choice_with_the_prompt(trained_model) -> None:
    body = {"prompt": PROMPT, "max_tokens": 10, "seed": 2, "n": 2}
    plain = complete(trained_model, body).json()
    echoed = complete(trained_model, {**body, "echo": True}).json()
    assert [c["text"] for c in echoed["choices"]] == [PROMPT + c["text"] for c in plain["choices"]]
    assert echoed["usage"] == plain["usage"]
    streamed = complete(trained_model, {**body, "echo": True, "stream": True})
    assert joined(openai_events(streamed.text)) == {
        0: echoed["choices"][0]["text"],
        1: echoed["choices"][1]["text"],
    }


def test_a_prompt_may_be_a_list_of_one_string_and_nulls_are_the_defaults(trained_model) -> None:
    """OpenAI's clients send a prompt as a list, and null for a parameter left at its default
    (max_tokens 16, temperature 1, top_p 1, n 1, no stop, a random seed)."""
    r = complete(trained_model, {"prompt": [PROMPT], "seed": 1})
    nulls = dict.fromkeys(["max_tokens", "temperature", "top_p", "n", "stop", "stream", "echo"])
    same = complete(trained_model, {"prompt": PROMPT, "seed": 1, **nulls})
    assert r.status_code == same.status_code == 200, (r.text, same.text)
    assert r.json()["choices"] == same.json()["choices"]
    assert len(r.json()["choices"][0]["text"]) == 16


def test_openais_parameters_at_their_neutral_value_are_accepted(trained_model) -> None:
    neutral = {
        "user": "someone",
        "logit_bias": {},
        "logprobs": None,
        "best_of": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "suffix": "",
        "stream_options": {"include_obfuscation": False},
    }
    r = complete(trained_model, {"prompt": PROMPT, "max_tokens": 5, "seed": 1, **neutral})
    assert r.status_code == 200, r.text
    plain = complete(trained_model, {"prompt": PROMPT, "max_tokens": 5, "seed": 1})
    assert r.json()["choices"] == plain.json()["choices"]


BAD = [
    ({"logprobs": 2}, "logprobs", "log-probabilities"),
    ({"best_of": 3}, "best_of", "best_of ranks candidates"),
    ({"presence_penalty": 0.5}, "presence_penalty", "repetition_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty", "leave it out or send 0"),
    ({"logit_bias": {"50256": -100}}, "logit_bias", "token ids"),
    ({"suffix": "end"}, "suffix", "suffix"),
    ({"prompt": ["a", "b"]}, "prompt", "holds 2 prompts"),
    ({"prompt": []}, "prompt", "holds 0 prompts"),
    ({"prompt": [1, 2, 3]}, "prompt", "token ids are not text"),
    ({"prompt": [[1, 2], [3]]}, "prompt", "token ids are not text"),
    ({"prompt": ""}, "prompt", "at least 1 character"),
    ({"prompt": "Shall X€"}, "prompt", "'X', '€'"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_tokens": 101}, "max_tokens", "less than or equal to 100"),  # the server's max_length
    ({"n": 5}, "n", "less than or equal to 4"),  # its max_num_samples
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"temperature": 1e-200}, "temperature", "must be 0 (greedy)"),
    ({"temperature": "0.5"}, "temperature", "valid number"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": [""]}, "stop", "stop[0]"),
    ({"stream_options": {"chunk_size": 3}}, "stream_options", "chunk_size"),
    ({"tempreature": 0.5}, "tempreature", "is not a parameter"),
    ({"model": None}, "model", "model: "),
]


@pytest.mark.parametrize(("body", "param", "words"), BAD)
def test_a_bad_or_unsupported_parameter_is_400_in_openais_shape(
    trained_model, body, param, words
) -> None:
    """Each is a 400 in OpenAI's error shape naming the parameter (not charlstm's 422), streamed
    or not, and generates nothing."""
    config = {"max_length": 100, "max_num_samples": 4}
    for stream in (False, True):
        r = complete(trained_model, {"prompt": PROMPT, **body, "stream": stream}, config)
        assert_openai_error(r, 400, param, words)


def test_a_body_that_is_not_json_is_400_in_openais_shape(trained_model) -> None:
    r = call(
        trained_model,
        "POST",
        "/v1/completions",
        content=b'{"model": "run", "prompt": ',
        headers={"Content-Type": "application/json"},
    )
    assert_openai_error(r, 400, None, "not valid JSON")


def test_a_model_the_server_does_not_have_is_404_model_not_found(trained_model) -> None:
    r = complete(trained_model, {"prompt": PROMPT, "model": "gpt-3.5-turbo-instruct"})
    error = assert_openai_error(r, 404, "model", "'gpt-3.5-turbo-instruct' does not exist", MODEL)
    assert error["code"] == "model_not_found"
    r = call(trained_model, "GET", "/v1/models/davinci-002")
    assert assert_openai_error(r, 404, "model")["code"] == "model_not_found"


# ----------------------------------------------------------------- the server's limits and keys


def test_the_servers_keys_limits_and_deadline_answer_in_openais_shape(trained_model) -> None:
    """The guard (a missing or wrong key: 401 with the Bearer challenge, a wrong content type:
    415), the body limit (413), the concurrency limit (429 with Retry-After) and the time limit
    (504, or an error event) all answer this dialect's requests in OpenAI's shape."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5}

    async def go():
        async with serving(trained_model, api_keys=(KEY,), max_concurrency=4) as (app, client):
            r = await client.post("/v1/completions", json=body)
            assert assert_openai_error(r, 401, None, "Bearer")["code"] == "invalid_api_key"
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="charlstm"'
            r = await client.post("/v1/completions", json=body, headers=bearer("x" * 20))
            assert_openai_error(r, 401, None, "refused")
            r = await client.post("/v1/completions", json=body, headers=bearer(KEY))
            assert r.status_code == 200, r.text
            r = await client.post(
                "/v1/completions",
                content=json.dumps(body),
                headers={**bearer(KEY), "Content-Type": "text/plain"},
            )
            assert_openai_error(r, 415, None, "application/json")
            big = {**body, "prompt": "a" * 70_000}
            r = await client.post("/v1/completions", json=big, headers=bearer(KEY))
            assert_openai_error(r, 413, None, "larger than")
            app.state.server.used = 3  # three of the four slots are taken
            r = await client.post("/v1/completions", json={**body, "n": 2}, headers=bearer(KEY))
            error = assert_openai_error(r, 429, None, "limit of 4 streams")
            assert error["code"] == "rate_limit_exceeded" and int(r.headers["Retry-After"]) >= 1
            app.state.server.used = 0

    run(go())

    async def late():
        async with serving(trained_model, time_limit=1e-6) as (app, client):
            r = await client.post("/v1/completions", json=body)
            assert assert_openai_error(r, 504, None, "time limit")["code"] == "time_limit"
            r = await client.post("/v1/completions", json={**body, "stream": True})
            assert r.status_code == 200
            events = openai_events(r.text)
            assert "[DONE]" not in events and events[-1]["error"]["code"] == "time_limit"
            assert events[-1]["error"]["type"] == "server_error"
            assert app.state.server.used == 0

    run(late())


def test_models_lists_both_dialects(trained_model) -> None:
    """GET /v1/models is shared: OpenAI's list (object, data) beside charlstm's (default,
    models), and its errors carry both shapes; /v1/models/{id} is one model in OpenAI's."""

    async def go():
        async with serving(trained_model, api_keys=(KEY,)) as (_, client):
            listing = (await client.get("/v1/models", headers=bearer(KEY))).json()
            one = (await client.get(f"/v1/models/{MODEL}", headers=bearer(KEY))).json()
            refused = await client.get("/v1/models")
            return listing, one, refused

    listing, one, refused = run(go())
    assert listing["object"] == "list"
    assert listing["data"] == [one]
    assert one["id"] == MODEL and one["object"] == "model" and one["owned_by"] == "charlstm"
    assert abs(one["created"] - trained_model.path.stat().st_mtime) < 2
    assert listing["default"] == MODEL and listing["models"][0]["name"] == MODEL
    assert refused.status_code == 401
    assert refused.json()["detail"] == refused.json()["error"]["message"]


# ------------------------------------------------------- the openai client against `charlstm serve`


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    """`charlstm serve` of the shared tiny run, with a key, on a port of the loopback chosen by
    the system (read from uvicorn's log); stopped at the end of the module."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            charlstm_cmd("serve", trained_run, "--port", 0, "--api-key", KEY),
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log_path.read_text())
            if found:
                break
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def client(served):
    import openai  # a test dependency, imported here: the fast tier does not pay for it

    with openai.OpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.mark.slow  # a real server process
def test_the_openai_client_completes_streamed_and_not(client) -> None:
    """The official client, pointed at `charlstm serve`: a completion of max_tokens characters
    with its usage; the streamed one with the same seed joins to the same text; the same seed
    gives the same text, another seed another; n=2 gives two choices; stop is honoured."""
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 30, "seed": 21, "temperature": 0.9}
    whole = client.completions.create(**args)
    [choice] = whole.choices
    assert whole.object == "text_completion" and whole.model == MODEL
    assert len(choice.text) == 30 and choice.finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(PROMPT), 30)
    assert whole.usage.total_tokens == len(PROMPT) + 30
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert client.completions.create(**args).choices[0].text == choice.text
    assert client.completions.create(**{**args, "seed": 22}).choices[0].text != choice.text
    two = client.completions.create(**args, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == choice.text
    assert two.choices[1].text != choice.text
    stop = choice.text[10:12]
    stopped = client.completions.create(**args, stop=[stop, "\x00"]).choices[0]
    assert (stopped.text, stopped.finish_reason) == (choice.text[: choice.text.find(stop)], "stop")
    usage = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert usage[-1].choices == [] and usage[-1].usage.completion_tokens == 30


@pytest.mark.slow  # a real server process
def test_the_openai_client_lists_the_model_and_greedy_is_the_native_greedy(client, served) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "charlstm"
    assert client.models.retrieve(MODEL).id == MODEL
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=50, temperature=0)
    native = httpx.post(
        f"{served}/v1/generate",
        json={"start_text": PROMPT, "length": 50, "temperature": 0},
        headers=bearer(KEY),
        timeout=60,
    )
    assert native.json()["samples"] == [PROMPT + greedy.choices[0].text]


@pytest.mark.slow  # a real server process
def test_errors_surface_as_the_openai_clients_own_exceptions(client, served) -> None:
    """A bad request, a wrong key and an unknown model raise the client's BadRequestError,
    AuthenticationError and NotFoundError, with the server's message, param and code."""
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=PROMPT, logprobs=3)
    assert bad.value.param == "logprobs"
    assert "does not compute log-probabilities" in bad.value.message
    with pytest.raises(openai.BadRequestError, match="holds 2 prompts"):
        client.completions.create(model=MODEL, prompt=["a", "b"])
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="davinci-002", prompt=PROMPT, stream=True)
    assert missing.value.code == "model_not_found"
    wrong = openai.OpenAI(base_url=f"{served}/v1", api_key="not-the-key-0123456", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.code == "invalid_api_key" and "refused" in refused.value.message
