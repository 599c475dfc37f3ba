"""The HTTP API through an in-process client: generation, streaming, every limit and error, and the
continuous batching that lets concurrent requests share the model's steps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time

import httpx
import pytest
import torch

import charlstm
from charlstm.serve.app import STATIC_DIR, ServerConfig, create_app
from tests.helpers import invoke, make_run, on_loopback, one_line_error

# Every letter, the space, comma, full stop and newline: the characters the requests below use.
PANGRAMS = (
    "the quick brown fox jumps over the lazy dog.\npack my box with five dozen liquor jugs, now.\n"
) * 30
LONG = 4000  # with the paced model, a generation of at least 4 s: it outlasts every check on it


@pytest.fixture(scope="module")
def pangrams(tmp_path_factory):
    path = tmp_path_factory.mktemp("srv") / "pangrams.txt"
    path.write_text(PANGRAMS, encoding="utf-8")
    return path


def served_run(folder, text, seed: int = 0):
    """A run folder of the tiny model trained two steps on `text` (one evaluation, so best/ holds
    a validation loss), made by charlstm's own training."""
    return make_run(folder, text, max_steps=2, eval_interval=2, seed=seed)


@pytest.fixture(scope="module")
def model(pangrams) -> charlstm.TextModel:
    return charlstm.load(served_run(pangrams.parent / "run", pangrams))


class Paced(torch.nn.Module):
    """A model whose every call takes at least a millisecond, so that a long generation is still
    running when a test looks at it however fast the engine becomes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, idx, hidden=None):
        time.sleep(0.001)
        return self.inner(idx, hidden)


@pytest.fixture(scope="module")
def paced(model) -> charlstm.TextModel:
    return charlstm.TextModel(Paced(model.model), model.vocab, model.meta, model.path, model.device)


def run(coro):
    """Run one test coroutine with a time limit, so that a hang fails instead of stalling CI."""
    return asyncio.run(asyncio.wait_for(coro, 60))


@contextlib.asynccontextmanager
async def serving(models, **config):
    app = create_app(models if isinstance(models, list) else [models], ServerConfig(**config))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        try:
            yield app, client
        finally:
            await app.state.server.shutdown()


def call(model, method: str, path: str, config: dict | None = None, **kwargs) -> httpx.Response:
    async def go():
        async with serving(model, **(config or {})) as (_, client):
            return await client.request(method, path, **kwargs)

    return run(go())


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """Events of a complete SSE body; asserts the framing (event and data lines, then a blank)."""
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: ")
        events.append((lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])))
    return events


def json_post_scope(
    path: str, data: bytes, *, host: str, server: tuple[str, int], spec_version: str | None = None
) -> dict:
    """The ASGI scope of a POST of the JSON `data` to `path`, as an HTTP server would build it."""
    asgi = (
        {"version": "3.0"}
        if spec_version is None
        else {"version": "3.0", "spec_version": spec_version}
    )
    return {
        "type": "http",
        "asgi": asgi,
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "server": server,
        "client": ("127.0.0.1", 5000),
        "headers": [
            (b"host", host.encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
        ],
    }


class RawStream:
    """Drives the ASGI app by hand, so that a test can read part of a response and then leave."""

    def __init__(self, app, body: dict, path: str = "/v1/generate/stream") -> None:
        data = json.dumps(body).encode()
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.sent: asyncio.Queue = asyncio.Queue()
        self.inbox.put_nowait({"type": "http.request", "body": data, "more_body": False})
        scope = json_post_scope(path, data, host="localhost", server=("test", 80))
        self.buffer = ""
        self.task = asyncio.create_task(app(scope, self.inbox.get, self.sent.put))

    async def status(self) -> int:
        message = await asyncio.wait_for(self.sent.get(), 10)
        assert message["type"] == "http.response.start"
        return message["status"]

    async def event(self) -> tuple[str, dict]:
        while "\n\n" not in self.buffer:
            message = await asyncio.wait_for(self.sent.get(), 10)
            self.buffer += message.get("body", b"").decode()
        block, self.buffer = self.buffer.split("\n\n", 1)
        return parse_sse(block + "\n\n")[0]

    async def until(self, name: str) -> dict:
        while True:
            event, data = await self.event()
            if event == name:
                return data

    async def leave(self) -> None:
        self.inbox.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(self.task, 10)


async def eventually(condition, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()


# --------------------------------------------------------------------------------------- generation


def test_generate_returns_samples_model_and_timing(model) -> None:
    """A sample is the start text plus `length` characters, the same as the library's for the same
    seed; the answer names the model, the seed and the timing."""
    body = {"start_text": "the ", "length": 50, "temperature": 0.8, "seed": 11}
    r = call(model, "POST", "/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "run" and out["seed"] == 11
    assert out["samples"] == model.generate("the ", 50, 0.8, seed=11)
    assert len(out["samples"][0]) == len("the ") + 50
    assert out["finish_reasons"] == ["length"]
    assert out["timing"]["characters"] == 50 and out["timing"]["total_ms"] > 0


def test_generate_without_seed_reports_the_seed_it_drew(model) -> None:
    """With no seed the server draws one and returns it, so the text can be made again."""
    first = call(model, "POST", "/v1/generate", json={"start_text": "a", "length": 30}).json()
    again = call(
        model, "POST", "/v1/generate", json={"start_text": "a", "length": 30, "seed": first["seed"]}
    ).json()
    assert again["samples"] == first["samples"]


def test_stream_is_server_sent_events_start_chunks_done(model) -> None:
    """The stream is `start`, one `chunk` per piece of text, then `done` with the whole samples."""
    body = {"start_text": "the ", "length": 300, "num_samples": 3, "seed": 5}
    r = call(model, "POST", "/v1/generate/stream", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[0] == (
        "start",
        {"model": "run", "start_text": "the ", "num_samples": 3, "seed": 5},
    )
    assert events[-1][0] == "done"
    chunks = events[1:-1]
    assert chunks and all(name == "chunk" for name, _ in chunks)
    texts = ["the "] * 3
    for _, data in chunks:
        texts[data["index"]] += data["text"]
    assert texts == events[-1][1]["samples"] == model.generate("the ", 300, num_samples=3, seed=5)
    assert len(set(texts)) == 3  # each sample has its own seed


def test_stop_string_and_max_lines_end_a_sample_early(model) -> None:
    """A stop rule ends the sample before the stop string, and says so in finish_reasons."""
    r = call(
        model,
        "POST",
        "/v1/generate",
        json={
            "start_text": "a",
            "length": 2000,
            "seed": 1,
            "temperature": 1.0,
            "stop": ["e"],
            "max_lines": 2,
        },
    )
    out = r.json()
    assert out["finish_reasons"] == ["stop"]
    generated = out["samples"][0][1:]
    assert "e" not in generated and generated.count("\n") <= 1 and len(generated) < 2000


def test_unknown_characters_are_dropped_on_request(model) -> None:
    """With unknown: "skip" characters the model never saw are dropped from the start text."""
    r = call(
        model,
        "POST",
        "/v1/generate",
        json={"start_text": "Hello", "unknown": "skip", "length": 5, "seed": 1},
    )
    assert r.status_code == 200
    assert r.json()["samples"][0].startswith("ello")


# --------------------------------------------------------------------------------------- validation


BAD_BODIES = [
    ({"temperature": -0.5}, "temperature"),
    ('{"start_text": "a", "temperature": NaN}', "temperature"),
    ('{"start_text": "a", "temperature": Infinity}', "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"length": 0}, "length"),
    ({"length": 101}, "length"),  # the server below allows 100
    ({"start_text": ""}, "start_text"),
    ({"start_text": "a" * 41}, "start_text"),  # and 40 start-text characters
    ({"start_text": "Hello"}, "start_text"),  # H is unknown
    ({"start_text": "HELLO", "unknown": "skip"}, "start_text"),  # nothing left after skipping
    ({"unknown": "maybe"}, "unknown"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": 5}, "num_samples"),  # more than max_num_samples
    ({"repetition_penalty": 0.5}, "repetition_penalty"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop[0]"),
    ({"max_lines": 0}, "max_lines"),
    ({"model": "nope"}, "model"),
    ({"tempreature": 0.5}, "tempreature"),  # a misspelt field is an error, never ignored
    ("{not json", "body"),
]


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/generate/stream"])
@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
def test_invalid_requests_are_422_naming_the_field_and_reason(model, path, body, field) -> None:
    """Every invalid field is answered 422 with the field's name and a reason, on both endpoints."""
    if isinstance(body, dict):
        kwargs = {"json": {"start_text": "a", **body}}
    else:
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    config = {"max_length": 100, "max_start_chars": 40, "max_num_samples": 4}
    r = call(model, "POST", path, config=config, **kwargs)
    assert r.status_code == 422, r.text
    details = r.json()["detail"]
    assert field in [d["field"] for d in details]
    assert all(d["reason"] for d in details)


def test_unknown_character_error_names_the_characters(model) -> None:
    r = call(model, "POST", "/v1/generate", json={"start_text": "aXb€"})
    reason = r.json()["detail"][0]["reason"]
    assert "'X'" in reason and "'€'" in reason and '"unknown": "skip"' in reason


def test_bodies_over_the_limit_are_413(model) -> None:
    """A body over max_body_bytes is refused with 413, whether it declares its length or not."""
    big = json.dumps({"start_text": "a" * 5000}).encode()

    async def chunked():
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    config = {"max_body_bytes": 4096}
    r = call(
        model,
        "POST",
        "/v1/generate",
        config=config,
        content=big,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and "4096" in r.json()["detail"]
    r = call(
        model,
        "POST",
        "/v1/generate",
        config=config,
        content=chunked(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413


# ---------------------------------------------------------------------------------------- limits


def test_beyond_max_concurrency_is_429_with_retry_after(paced) -> None:
    """With every slot taken the next request gets 429 and Retry-After; a slot freed admits it."""

    async def go():
        async with serving(paced, max_concurrency=2) as (app, client):
            streams = [RawStream(app, {"start_text": "a", "length": LONG}) for _ in range(2)]
            for s in streams:
                assert await s.status() == 200
                await s.until("chunk")
            r = await client.post("/v1/generate", json={"start_text": "a", "length": 5})
            assert r.status_code == 429
            assert int(r.headers["Retry-After"]) >= 1
            r = await client.post("/v1/generate/stream", json={"start_text": "a", "length": 5})
            assert r.status_code == 429
            await streams[0].leave()
            r = await client.post("/v1/generate", json={"start_text": "a", "length": 5})
            assert r.status_code == 200
            await streams[1].leave()

    run(go())


def test_a_generation_past_its_time_limit_ends_with_an_error(paced) -> None:
    """Past the time limit a stream ends with an `error` event (time_limit), a plain request with
    504, and both free their slots."""

    async def go():
        async with serving(paced, time_limit=0.05) as (app, client):
            r = await client.post("/v1/generate/stream", json={"start_text": "a", "length": LONG})
            events = parse_sse(r.text)
            name, data = events[-1]
            assert name == "error" and data["error"] == "time_limit"
            assert "time limit" in data["message"]
            assert sum(len(d["text"]) for n, d in events if n == "chunk") < LONG
            r = await client.post("/v1/generate", json={"start_text": "a", "length": LONG})
            assert r.status_code == 504 and "time limit" in r.json()["detail"]
            assert app.state.server.used == 0
            await eventually(lambda: app.state.server.workers["run"].engine.active == 0)

    run(go())


def test_a_client_that_leaves_mid_stream_frees_its_slot_at_once(paced) -> None:
    """Disconnecting mid-stream frees the slot before the response task ends and drops the stream
    from the engine's batch at the next step."""

    async def go():
        async with serving(paced) as (app, _):
            server, worker = app.state.server, app.state.server.workers["run"]
            stream = RawStream(app, {"start_text": "a", "length": LONG})
            assert await stream.status() == 200
            await stream.until("chunk")
            assert server.used == 1 and worker.engine.active == 1
            await stream.leave()
            assert server.used == 0
            await eventually(lambda: worker.engine.active == 0)

    run(go())


def test_a_client_that_leaves_a_plain_request_frees_its_slot(paced) -> None:
    async def go():
        async with serving(paced) as (app, _):
            server, worker = app.state.server, app.state.server.workers["run"]
            request = RawStream(app, {"start_text": "a", "length": LONG}, path="/v1/generate")
            await eventually(lambda: worker.engine.active == 1)
            await request.leave()
            assert server.used == 0
            await eventually(lambda: worker.engine.active == 0)

    run(go())


def test_concurrent_requests_share_the_batch_and_keep_their_own_text(model, paced) -> None:
    """Two overlapping requests are rows of one engine batch (continuous batching), and a request's
    text does not depend on its neighbours."""
    body = {"start_text": "the ", "length": 200, "temperature": 0.9, "seed": 3}

    async def go():
        async with serving(paced) as (app, client):
            worker = app.state.server.workers["run"]
            long_stream = RawStream(app, {"start_text": "a", "length": LONG, "seed": 1})
            await long_stream.until("chunk")
            r = await client.post("/v1/generate", json=body)  # joins the running batch
            assert worker.peak_active >= 2
            await long_stream.leave()
            return r.json()["samples"]

    shared = run(go())
    alone = call(model, "POST", "/v1/generate", json=body).json()["samples"]
    assert shared == alone


def test_max_batch_makes_streams_wait_for_a_row(model) -> None:
    """With max_batch 1 the second request waits for the first to finish, and both complete."""

    async def go():
        async with serving(model, max_batch=1) as (app, client):
            bodies = [{"start_text": "a", "length": 100, "seed": s} for s in (1, 2)]
            rs = await asyncio.gather(*(client.post("/v1/generate", json=b) for b in bodies))
            assert [r.status_code for r in rs] == [200, 200]
            assert app.state.server.workers["run"].peak_active == 1

    run(go())


# ---------------------------------------------------------------------------------------- models


def test_model_info_has_configuration_vocabulary_and_validation_loss(model) -> None:
    """The model's name, configuration, vocabulary and metrics, as its checkpoint holds them."""
    info = call(model, "GET", "/v1/model").json()
    val_loss = model.meta["metrics"]["val_loss"]
    assert info["name"] == "run"
    assert info["vocab_size"] == len(set(PANGRAMS))
    assert info["vocabulary"] == "".join(model.vocab.chars)
    assert info["model"]["hidden_size"] == 16
    assert info["val_loss"] == val_loss
    assert math.isclose(info["val_bits_per_char"], val_loss / math.log(2))
    assert info["metrics"]["val_loss"] == val_loss
    assert info["limits"]["max_length"] == 4000


def test_several_models_are_chosen_by_the_model_field(model, pangrams, tmp_path) -> None:
    """Two runs with the same folder name are served as run and run-2; `model` picks one."""
    other = charlstm.load(served_run(tmp_path / "run", pangrams, seed=1))
    other_loss = other.meta["metrics"]["val_loss"]
    assert other_loss != model.meta["metrics"]["val_loss"]  # so the answer below tells them apart

    async def go():
        async with serving([model, other]) as (_, client):
            listing = (await client.get("/v1/models")).json()
            assert listing["default"] == "run"
            assert [m["name"] for m in listing["models"]] == ["run", "run-2"]
            info = (await client.get("/v1/model", params={"model": "run-2"})).json()
            assert info["val_loss"] == other_loss
            assert (await client.get("/v1/model", params={"model": "nope"})).status_code == 404
            body = {"start_text": "a", "length": 40, "seed": 2}
            first = (await client.post("/v1/generate", json=body)).json()
            second = (await client.post("/v1/generate", json={**body, "model": "run-2"})).json()
            assert first["model"] == "run" and second["model"] == "run-2"
            assert second["samples"] == other.generate("a", 40, seed=2)
            assert first["samples"] != second["samples"]

    run(go())


def test_healthz(model) -> None:
    r = call(model, "GET", "/healthz")
    assert r.json() == {"status": "ok", "models": ["run"], "streams": 0, "max_concurrency": 64}


# --------------------------------------------------------------------------------------- page, docs


def test_page_and_docs_are_served_without_any_cdn(model) -> None:
    """The page, its assets and the API docs all come from the app: no file points elsewhere."""

    async def go():
        async with serving(model) as (_, client):
            page = await client.get("/")
            assert (
                page.status_code == 200
                and 'id="generate"' in page.text
                and 'id="stop"' in page.text
            )
            for name in ("app.js", "style.css"):
                assert (await client.get(f"/static/{name}")).status_code == 200
            docs = (await client.get("/docs")).text
            assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs
            assert (await client.get("/docs-assets/swagger-ui-bundle.js")).status_code == 200
            spec = (await client.get("/openapi.json")).json()
            assert {"/v1/generate", "/v1/generate/stream", "/v1/model", "/healthz"} <= set(
                spec["paths"]
            )
            schema = spec["components"]["schemas"]["GenerateRequest"]["properties"]
            assert schema["length"]["maximum"] == 4000

    run(go())
    for path in STATIC_DIR.iterdir():
        assert "http://" not in path.read_text() and "https://" not in path.read_text(), path


def test_serve_cli_reports_a_missing_run_without_traceback(tmp_path) -> None:
    one_line_error(invoke("serve", tmp_path / "missing"), "does not exist")


def test_serve_cli_help_lists_the_limits() -> None:
    result = invoke("serve", "--help")
    for flag in (
        "--host",
        "--port",
        "--max-length",
        "--max-concurrency",
        "--max-batch",
        "--time-limit",
    ):
        assert flag in result.output


def test_start_up_warms_each_models_kernels_before_its_worker_starts(model, monkeypatch) -> None:
    """At start-up the server runs every served model's compiled kernels once, at that model's own
    weights, before any worker takes requests (what `kernels.warm_up` promises `charlstm serve`)."""
    from charlstm.generate import kernels

    app = create_app([model, model], ServerConfig())
    workers = list(app.state.server.workers.values())
    calls = []
    real = kernels.warm_up

    def spy(weights=None):
        calls.append((weights, [w.shards[0].thread is not None for w in workers]))
        return real(weights)

    monkeypatch.setattr(kernels, "warm_up", spy)

    async def go():
        async with app.router.lifespan_context(app):
            return [w.shards[0].thread is not None for w in workers]

    started_after = run(go())
    assert len(calls) == 2 and started_after == [True, True]
    assert all(weights is not None and not any(started) for weights, started in calls)
    assert all(weights.vocab_size == len(model.vocab) for weights, _ in calls)  # the model's own
    assert all(isinstance(w.warm_up_seconds, float) for w in workers)


# ------------------------------------------------------------------------ one request fails alone

HUGE = 10**6  # characters per sample: with the compiled model, still running when a test looks


def stream_job(app):
    """The one job of the default model's worker (a test's running stream)."""
    (job,) = app.state.server.workers["run"].jobs
    return job


async def keeps_going(job) -> None:
    """`job` (a running stream) is still generating: more text arrives, and no error."""
    before = sum(job.drawn)
    await eventually(lambda: sum(job.drawn) > before or job.error is not None)
    assert job.error is None and sum(job.drawn) > before


def test_a_hostile_top_k_is_422_and_the_running_streams_go_on(model) -> None:
    """The issue's confirmed case: a running 4-sample stream, then a request whose top_k does not
    fit the compiled engine's int64 (it used to overflow there, and the worker's reset ended every
    stream in flight with an error and the request itself with a 500). Now the schema caps top_k
    at the vocabulary: 422 naming the field, and the stream goes on."""

    async def go():
        async with serving(model, max_length=HUGE) as (app, client):
            stream = RawStream(app, {"start_text": "the ", "length": HUGE, "num_samples": 4})
            assert await stream.status() == 200
            await stream.until("chunk")
            job = stream_job(app)
            for top_k in (2**63, 2**63 - 1, len(model.vocab) + 1):
                body = {"start_text": "a", "length": 5, "top_k": top_k}
                for path in ("/v1/generate", "/v1/generate/stream"):
                    r = await client.post(path, json=body)
                    assert r.status_code == 422, (top_k, r.status_code, r.text)
                    assert [e["field"] for e in r.json()["detail"]] == ["top_k"]
            await keeps_going(job)
            r = await client.post("/v1/generate", json={"start_text": "a", "length": 5, "top_k": 3})
            assert r.status_code == 200
            await keeps_going(job)
            await stream.leave()
            assert app.state.server.used == 0

    run(go())


def test_top_k_is_capped_at_the_largest_vocabulary_and_checked_per_model(model, tmp_path) -> None:
    """With two models, the schema's top_k bound is the larger vocabulary (so the OpenAPI document
    states it), and a request for the smaller model is checked against its own: 422 naming top_k,
    the bound and the model."""
    from charlstm.config import ModelConfig
    from charlstm.data.vocabulary import Vocabulary
    from charlstm.model import CharRNN

    chars = sorted(set(PANGRAMS) | set("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    net = CharRNN(ModelConfig(embedding_size=4, hidden_size=8, num_layers=1, vocab_size=len(chars)))
    big = charlstm.TextModel(net, Vocabulary(tuple(chars)), {}, tmp_path / "big", model.device)
    small_v, big_v = len(model.vocab), len(chars)
    assert small_v < big_v

    async def go():
        async with serving([model, big]) as (_, client):
            schema = (await client.get("/openapi.json")).json()["components"]["schemas"]
            top_k = schema["GenerateRequest"]["properties"]["top_k"]
            assert [t.get("maximum") for t in top_k["anyOf"] if t.get("type") == "integer"] == [
                big_v
            ]
            answers = {}
            for name, k in (
                ("run", small_v),
                ("run", small_v + 1),
                ("big", big_v),
                ("big", big_v + 1),
            ):
                body = {"start_text": "a", "length": 3, "top_k": k, "model": name}
                answers[name, k] = await client.post("/v1/generate", json=body)
            assert answers["run", small_v].status_code == 200
            assert answers["big", big_v].status_code == 200
            for key in (("run", small_v + 1), ("big", big_v + 1)):
                r = answers[key]
                assert r.status_code == 422, (key, r.text)
                (error,) = r.json()["detail"]
                assert error["field"] == "top_k"
            reason = answers["run", small_v + 1].json()["detail"][0]["reason"]
            assert str(small_v) in reason and "run" in reason

    run(go())


def test_a_request_that_fails_to_join_the_batch_ends_alone(model) -> None:
    """A request whose streams cannot be added to the engine (here top_k past the vocabulary, handed
    to the worker without the server's checks) fails with its own error and frees its slots; the
    streams already running go on, in the same engine."""
    from charlstm.generate.engine import Request as EngineRequest
    from charlstm.generate.sampling import SamplingParams
    from charlstm.serve.worker import Job

    async def go():
        async with serving(model, max_length=HUGE) as (app, _):
            worker = app.state.server.workers["run"]
            stream = RawStream(app, {"start_text": "the ", "length": HUGE, "num_samples": 2})
            await stream.until("chunk")
            running, engine = stream_job(app), worker.engine
            closed = []
            prompt = model.vocab.encode("a")
            bad = [EngineRequest(prompt, 5, SamplingParams(1.0, top_k=2**63), s) for s in (1, 2)]
            job = Job(bad, "a", 0, time.perf_counter() + 60, on_close=closed.append)
            worker.submit(job)
            await eventually(lambda: job.done)
            assert job.error is not None and job.error.kind == "internal"
            assert closed == [job]  # its slots are released
            await keeps_going(running)
            assert worker.engine is engine  # not reset
            await stream.leave()

    run(go())


def test_a_stream_that_fails_in_a_step_ends_alone(model, monkeypatch) -> None:
    """A failure while stepping one request's stream (injected into the stop rule's hand-out)
    ends that request alone: 500 for a plain request, an `error` event for a stream; the other
    requests in the batch go on."""
    from charlstm.generate import engine as engine_module

    real = engine_module._hand_out

    def failing(s, new, drawn):
        if s.request.length == 77:
            raise RuntimeError("injected failure")
        return real(s, new, drawn)

    monkeypatch.setattr(engine_module, "_hand_out", failing)

    async def go():
        async with serving(model, max_length=HUGE) as (app, client):
            stream = RawStream(app, {"start_text": "the ", "length": HUGE, "num_samples": 2})
            await stream.until("chunk")
            running = stream_job(app)
            r = await client.post("/v1/generate", json={"start_text": "a", "length": 77})
            assert r.status_code == 500 and "failed" in r.json()["detail"]
            r = await client.post("/v1/generate/stream", json={"start_text": "a", "length": 77})
            name, data = parse_sse(r.text)[-1]
            assert name == "error" and data["error"] == "internal"
            await keeps_going(running)
            r = await client.post("/v1/generate", json={"start_text": "a", "length": 78})
            assert r.status_code == 200
            await stream.leave()
            assert app.state.server.used == 0

    run(go())


# ------------------------------------------------------------------ clients that stop reading


class Unread:
    """Drives the ASGI app as a client that reads `reads` messages and then stops reading: every
    later send blocks, as uvicorn's does once the socket's buffers are full (it awaits the
    transport's drain), for `delay` seconds each, or for ever when `delay` is None."""

    def __init__(self, app, body: dict, reads: int = 1, delay: float | None = None) -> None:
        data = json.dumps(body).encode()
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.inbox.put_nowait({"type": "http.request", "body": data, "more_body": False})
        self.got: list[dict] = []
        self.blocked = asyncio.Event()
        self.reads, self.delay = reads, delay
        path = "/v1/generate/stream"
        scope = json_post_scope(
            path, data, host="127.0.0.1:8000", server=("127.0.0.1", 8000), spec_version="2.3"
        )
        self.task = asyncio.create_task(app(scope, self.inbox.get, self.send))

    async def send(self, message: dict) -> None:
        if len(self.got) >= self.reads:
            self.blocked.set()
            await asyncio.sleep(self.delay if self.delay is not None else 3600)
        self.got.append(message)

    @property
    def completed(self) -> bool:
        """Whether the response was sent whole (its last body message said no more body)."""
        return bool(self.got) and self.got[-1].get("more_body") is False

    async def leave(self) -> None:
        self.inbox.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(self.task, 10)


def test_a_client_that_stops_reading_frees_its_slots_when_its_generation_ends(model) -> None:
    """The slots of a request are free once its generation ends, while its response still waits
    for a client that does not read (it used to hold them until the response was sent)."""

    async def go():
        async with serving(model) as (app, _):
            server = app.state.server
            client = Unread(app, {"start_text": "a", "length": 500, "num_samples": 4}, reads=1)
            await asyncio.wait_for(client.blocked.wait(), 10)
            await eventually(lambda: server.used == 0)
            assert not client.task.done()  # still blocked in a send
            await client.leave()

    run(go())


def test_a_client_that_stops_reading_is_cut_off_after_the_idle_write_timeout(
    model, monkeypatch
) -> None:
    """A response whose client accepts nothing for the idle-write timeout ends (uvicorn then closes
    the connection), without the rest of its events."""
    from charlstm.serve import app as app_module

    monkeypatch.setattr(app_module, "WRITE_TIMEOUT", 0.05, raising=False)

    async def go():
        async with serving(model) as (app, _):
            client = Unread(app, {"start_text": "a", "length": 500, "num_samples": 2}, reads=2)
            await asyncio.wait_for(client.task, 10)
            assert len(client.got) == 2 and not client.completed
            assert app.state.server.used == 0

    run(go())


def test_a_response_ends_at_its_hard_deadline_however_steadily_its_client_reads(
    paced, monkeypatch
) -> None:
    """A client that accepts every event, but each one slowly (within the idle-write timeout), is
    cut off at the response's hard deadline: the time limit plus a grace."""
    from charlstm.serve import app as app_module

    monkeypatch.setattr(app_module, "DEADLINE_GRACE", 0.05, raising=False)

    async def go():
        async with serving(paced, time_limit=0.1) as (app, _):
            client = Unread(app, {"start_text": "a", "length": LONG}, reads=1, delay=2.0)
            await asyncio.wait_for(client.task, 10)
            assert len(client.got) <= 2 and not client.completed
            assert app.state.server.used == 0

    run(go())


# ----------------------------------------------------------------------------------- priming


def count_primed(monkeypatch) -> list[int]:
    """Record the characters of each call of the compiled priming kernel."""
    from charlstm.generate import kernels

    calls: list[int] = []
    real = kernels.prime_row

    def counting(*args):
        calls.append(len(args[-1]))
        return real(*args)

    monkeypatch.setattr(kernels, "prime_row", counting)
    return calls


def test_a_request_primes_its_start_text_once_for_all_its_samples(model, monkeypatch) -> None:
    """16 samples of one 2,000-character start text run those characters through the model once
    (they used to be primed once per sample), and each sample is what it is alone."""
    calls = count_primed(monkeypatch)
    text = (PANGRAMS * 2)[:2000]
    body = {"start_text": text, "length": 20, "num_samples": 16, "seed": 5, "temperature": 1.0}

    async def go():
        async with serving(model) as (_, client):
            r = await client.post("/v1/generate", json=body)
            assert r.status_code == 200
            return r.json()["samples"]

    samples = run(go())
    assert sum(calls) == 2000
    assert samples == model.generate(text, 20, temperature=1.0, num_samples=16, seed=5)


def test_a_request_too_large_for_one_engine_is_spread_over_them(model) -> None:
    """With two engines of four rows each, six samples of one request run three in each (its start
    text primed in each), and every sample is what it is alone; both engines' rows are free
    after."""
    body = {"start_text": "the ", "length": 300, "num_samples": 6, "seed": 9, "temperature": 1.0}

    async def go():
        async with serving(model, max_concurrency=8, engine_threads=2) as (app, client):
            worker = app.state.server.workers["run"]
            r = await client.post("/v1/generate", json=body)
            assert r.status_code == 200
            assert [shard.peak_active for shard in worker.shards] == [3, 3]
            assert [shard.assigned for shard in worker.shards] == [0, 0]
            return r.json()["samples"]

    samples = run(go())
    assert samples == model.generate("the ", 300, temperature=1.0, num_samples=6, seed=9)


def test_priming_a_long_start_text_is_spread_over_ticks_between_steps(model, monkeypatch) -> None:
    """A long start text is primed a bounded piece per tick, and the streams already running take
    their steps in every one of those ticks (they used to wait for all of it)."""
    calls = count_primed(monkeypatch)
    ticks = []  # per tick: characters primed, steps taken

    async def go():
        async with serving(model, max_length=HUGE, engine_threads=1) as (app, client):
            worker = app.state.server.workers["run"]
            worker.prime_chars = 256
            (shard,) = worker.shards
            real = shard.tick

            def tick():  # in the engine thread
                primed, steps = sum(calls), worker.steps
                real()
                ticks.append((sum(calls) - primed, worker.steps - steps))

            shard.tick = tick
            stream = RawStream(app, {"start_text": "the ", "length": HUGE})
            await stream.until("chunk")
            body = {"start_text": (PANGRAMS * 2)[:2000], "length": 5, "num_samples": 16}
            r = await client.post("/v1/generate", json=body)
            assert r.status_code == 200
            await stream.leave()

    run(go())
    priming = [(chars, steps) for chars, steps in ticks if chars]
    assert sum(chars for chars, _ in priming) == 2000 + len("the ")
    assert len(priming) >= 2000 // 256
    assert all(chars <= 256 for chars, _ in priming)
    assert all(steps >= 1 for _, steps in priming[1:])  # the first tick may prime "the " alone


@pytest.mark.slow  # a real uvicorn on a loopback port
def test_a_connection_whose_client_stops_reading_is_aborted_after_the_write_timeout(
    model, monkeypatch
) -> None:
    """Behind uvicorn, with `serve`'s protocol: a client that never reads a stream larger than the
    socket's buffers has its connection aborted once nothing moved for the write timeout (a
    graceful close would wait for ever to send what is buffered, and the connection would count
    against the connection limit for ever); its slots were free before that."""
    import socket

    from charlstm.serve import app as app_module

    monkeypatch.setattr(app_module, "WRITE_TIMEOUT", 60.0, raising=False)  # the protocol's turn
    config = ServerConfig()
    app = create_app([model], config)
    # A small fixed send buffer: the stream below fills it and the transport's 64 KiB, and the
    # server must wait for the client.
    with on_loopback(app, write_timeout=0.3, sndbuf=4096) as (server, listener):
        body = json.dumps({"start_text": "the ", "length": 4000, "num_samples": 8}).encode()
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(listener.getsockname())
            client.sendall(
                b"POST /v1/generate/stream HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            for _ in range(1000):  # the server takes the connection, then lets it go
                if server.server_state.connections:
                    break
                time.sleep(0.01)
            for _ in range(2000):
                if not server.server_state.connections:
                    break
                time.sleep(0.01)
            assert not server.server_state.connections, "the unread connection is still open"
            assert app.state.server.used == 0
            client.settimeout(10)
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := client.recv(1 << 16):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200 ") and not data.endswith(b"0\r\n\r\n")


# ---------------------------------------------------------------------- many characters a tick


@pytest.mark.slow  # a dozen streams of 400 characters and two runs of the command
@pytest.mark.parametrize("engine_threads", [1, 2])
def test_streams_on_both_routes_are_what_charlstm_generate_writes(
    model, pangrams, engine_threads, monkeypatch
) -> None:
    """Twelve streams at once, native and OpenAI's, share the batch (many characters per engine
    call, handed out in chunks), and each one's text is, character for character, what `charlstm
    generate` writes with the same seed and start text: with one engine, and with two that each
    step their share of the streams in a thread of their own. (The engines wait until all twelve
    requests are in: an engine thread starts on the first at once, and this model draws 400
    characters in milliseconds.)"""
    from charlstm.serve.worker import Shard

    gate, real_tick = threading.Event(), Shard.tick

    def gated_tick(self):
        gate.wait(30)
        real_tick(self)

    monkeypatch.setattr(Shard, "tick", gated_tick)
    run_folder = pangrams.parent / "run"
    native = [
        {"start_text": "the ", "length": 400, "temperature": 0.9, "seed": s} for s in range(8)
    ]
    openai = [
        {"model": "run", "prompt": "the ", "max_tokens": 400, "temperature": 0.9, "seed": s}
        for s in range(20, 24)
    ]

    async def go():
        async with serving(model, engine_threads=engine_threads) as (app, client):

            async def one_native(body):
                r = await client.post("/v1/generate/stream", json=body)
                chunks = [d["text"] for name, d in parse_sse(r.text) if name == "chunk"]
                return "the " + "".join(chunks)

            async def one_openai(body):
                r = await client.post("/v1/completions", json={**body, "stream": True})
                lines = [line[len("data: ") :] for line in r.text.split("\n") if line]
                assert lines[-1] == "[DONE]"
                return "the " + "".join(json.loads(d)["choices"][0]["text"] for d in lines[:-1])

            worker = app.state.server.workers["run"]
            every = asyncio.gather(
                *(one_native(b) for b in native), *(one_openai(b) for b in openai)
            )
            await eventually(lambda: len(worker.jobs) == len(native) + len(openai))
            gate.set()
            texts = await every
            assert len(worker.shards) == engine_threads
            # all twelve at once: one batch (the batched kernels), or six in each engine
            assert [shard.peak_active for shard in worker.shards] == [12 // engine_threads] * (
                engine_threads
            )
            assert worker.calls < worker.steps / 4  # many characters per engine call
            return texts

    texts = run(go())
    seeds = [b["seed"] for b in native] + [b["seed"] for b in openai]
    for text, seed in zip(texts, seeds):
        assert [text] == model.generate("the ", 400, 0.9, seed=seed)
    for text, seed in [(texts[0], 0), (texts[-1], 23)]:  # and through the command itself
        args = ["generate", run_folder, "--start-text", "the ", "--length", 400]
        result = invoke(*args, "--temperature", 0.9, "--seed", seed)
        assert result.exit_code == 0 and result.output == text + "\n", result.output


def test_a_client_gets_its_first_text_at_once_and_the_rest_in_chunks(paced) -> None:
    """The first text of a stream goes out as soon as it is drawn; later text waits for the next
    chunk (at most `chunk_seconds`), here longer than the generation: one more chunk, with done."""

    async def go():
        async with serving(paced, chunk_seconds=60.0) as (app, _):
            stream = RawStream(app, {"start_text": "a", "length": 300})
            assert await stream.status() == 200
            first = await stream.until("chunk")
            assert app.state.server.used == 1  # still generating
            assert 0 < len(first["text"]) < 300
            rest = await stream.event()
            assert rest[0] == "chunk" and len(first["text"] + rest[1]["text"]) == 300
            assert (await stream.event())[0] == "done"
            await stream.leave()

    run(go())


def test_requests_with_the_same_start_text_share_its_priming(model, monkeypatch) -> None:
    """A start text primed for one request is not primed again for the next one that has it."""
    calls = count_primed(monkeypatch)
    text = (PANGRAMS * 2)[:1500]

    async def go():
        async with serving(model) as (_, client):
            bodies = [{"start_text": text, "length": 20, "seed": seed} for seed in (1, 2, 3)]
            return [(await client.post("/v1/generate", json=b)).json()["samples"] for b in bodies]

    samples = run(go())
    assert sum(calls) == 1500
    assert samples == [model.generate(text, 20, seed=seed) for seed in (1, 2, 3)]


def test_the_pace_fits_a_tick_and_guesses_cautiously() -> None:
    """`Pace` turns the measured time of a step into characters per call: as many as fit in the
    time asked for, between 1 and its cap; a batch size not yet measured is guessed from the
    nearest measured one, never as faster than a larger batch nor than its rows scaled."""
    from charlstm.serve.worker import Pace

    pace = Pace(max_chars=256)
    assert pace.chars(64, 0.01) == 1  # nothing measured: one character, to measure
    pace.record(64, 10, 0.002)  # 64 rows: 0.2 ms a step
    assert pace.chars(64, 0.01) == 50
    assert pace.chars(64, 10.0) == 256 and pace.chars(64, 0.0) == 1
    assert pace.chars(40, 0.01) == 50  # the same bucket
    assert pace.chars(8, 0.01) == 50  # fewer rows: no faster than 64 until measured
    assert pace.chars(128, 0.01) == 25  # twice the rows: twice the time until measured
    pace.record(128, 10, 0.003)
    assert pace.chars(128, 0.01) == 33
