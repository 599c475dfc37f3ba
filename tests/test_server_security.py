"""What lets the server be exposed (docs/security.md): API keys, the Host allowlist against DNS
rebinding, the JSON content type, deadlines for slow request headers and bodies, the connection
limit, and the security headers of every response. In-process through the ASGI app, except where
the HTTP server itself is what is tested (a real uvicorn on a loopback port)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
import uvicorn

from charlstm.errors import UserError
from charlstm.serve import app as app_module
from charlstm.serve import security
from charlstm.serve.app import ServerConfig, create_app
from tests.helpers import invoke, one_line_error

KEY, OTHER_KEY = "k" * 16 + "-first.key", "second_key~" + "9" * 16


def run(coro):
    """Run one test coroutine with a time limit, so that a hang fails instead of stalling CI."""
    return asyncio.run(asyncio.wait_for(coro, 60))


@contextlib.asynccontextmanager
async def serving(model, host: str = "localhost", **config):
    app = create_app([model], ServerConfig(**config))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
        try:
            yield app, client
        finally:
            await app.state.server.shutdown()


def call(model, method: str, path: str, config: dict | None = None, host: str = "localhost", **kw):
    async def go():
        async with serving(model, host, **(config or {})) as (_, client):
            return await client.request(method, path, **kw)

    return run(go())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


GENERATE = {"start_text": "a", "length": 5, "seed": 1}

# ------------------------------------------------------------------------------------- API keys


def test_with_keys_the_api_needs_one_of_them_as_a_bearer_token(trained_model) -> None:
    """Without a key, with a wrong one or another scheme the API answers 401 with a Bearer
    challenge (RFC 6750); each of the server's keys is accepted, on every endpoint under /v1."""
    config = {"api_keys": (KEY, OTHER_KEY)}

    async def go():
        async with serving(trained_model, **config) as (_, client):
            r = await client.post("/v1/generate", json=GENERATE)
            assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="charlstm"'
            for header in (f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", "Bearer", KEY):
                r = await client.get("/v1/models", headers={"Authorization": header})
                assert r.status_code == 401, header
                assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
                assert "refused" in r.json()["detail"]
            for key in (KEY, OTHER_KEY):
                assert (await client.get("/v1/models", headers=bearer(key))).status_code == 200
                assert (await client.get("/v1/model", headers=bearer(key))).status_code == 200
                r = await client.post("/v1/generate", json=GENERATE, headers=bearer(key))
                assert r.status_code == 200, r.text
                r = await client.post("/v1/generate/stream", json=GENERATE, headers=bearer(key))
                assert r.status_code == 200 and "event: done" in r.text
            r = await client.get("/v1/models", headers={"Authorization": f"bearer  {KEY} "})
            assert r.status_code == 200  # the scheme is case-insensitive (RFC 7235)

    run(go())


def test_health_the_page_and_the_docs_stay_open_with_keys(trained_model) -> None:
    """/healthz, the page, its assets and the API's description need no key (the page asks for
    it); a path that does not exist is 401 rather than 404, so nothing is learnt without one."""

    async def go():
        async with serving(trained_model, api_keys=(KEY,)) as (_, client):
            for path in ("/healthz", "/", "/static/app.js", "/openapi.json", "/docs"):
                assert (await client.get(path)).status_code == 200, path
            assert (await client.get("/v1/nothing")).status_code == 401
            assert (await client.get("/v1/nothing", headers=bearer(KEY))).status_code == 404

    run(go())


def test_without_keys_no_key_is_asked(trained_model) -> None:
    r = call(trained_model, "POST", "/v1/generate", json=GENERATE)
    assert r.status_code == 200 and "www-authenticate" not in r.headers


def test_every_key_is_compared_in_constant_time(trained_model, monkeypatch) -> None:
    """A token is compared with every key, whichever matches (or none), always through
    `hmac.compare_digest` on SHA-256 digests of the same length, so that neither the time nor the
    token's length tells which key matched or how much of one a guess got right."""
    seen: list[tuple[int, int]] = []
    real = security.hmac.compare_digest

    def spy(a, b):
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    guard = security.Guard(None, api_keys=(KEY, OTHER_KEY, "z" * 40))
    for token, accepted in ((KEY, True), (OTHER_KEY, True), ("z" * 40, True), ("nope", False)):
        seen.clear()
        assert guard.key_accepted(f"Bearer {token}") is accepted
        assert seen == [(32, 32)] * 3, token


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        (("short-key",), "API key 1 has 9 characters"),
        ((KEY, "has space in it here"), "API key 2 has characters a Bearer token cannot hold"),
        (("ключ" * 5,), "API key 1 has characters"),
    ],
)
def test_a_weak_or_malformed_key_is_refused_at_start(keys, words) -> None:
    with pytest.raises(UserError, match=words):
        ServerConfig(api_keys=keys)


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"max_connections": 0}, "max_connections must be >= 1, got 0"),
        ({"header_timeout": 0}, "header_timeout and body_timeout must be > 0"),
        ({"body_timeout": -1.0}, "header_timeout and body_timeout must be > 0"),
    ],
)
def test_a_limit_that_is_not_positive_is_refused_at_start(setting, words) -> None:
    with pytest.raises(UserError, match=words):
        ServerConfig(**setting)


def test_the_config_never_shows_its_keys() -> None:
    assert KEY not in repr(ServerConfig(api_keys=(KEY,)))


# ------------------------------------------------------------------------------ DNS rebinding


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8000", "LOCALHOST", "app.localhost:80", "127.0.0.1:8000", "[::1]:8000"]
    + ["10.0.0.7", "192.168.1.20:8000", "203.0.113.9"],
)
def test_localhost_names_and_ip_addresses_are_served(trained_model, host) -> None:
    """A localhost name or an IP address in the Host header cannot be a rebound DNS name."""
    r = call(trained_model, "GET", "/healthz", headers={"Host": host})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example"])
def test_another_host_name_is_403_on_every_path(trained_model, host) -> None:
    """A page whose own name was rebound to 127.0.0.1 sends its name as the Host: refused, on the
    API, the page and the health check alike, before anything is generated."""

    async def go():
        async with serving(trained_model) as (app, client):
            for method, path in (("GET", "/healthz"), ("GET", "/"), ("POST", "/v1/generate")):
                r = await client.request(method, path, json=GENERATE, headers={"Host": host})
                assert r.status_code == 403, (path, r.text)
                assert "--allowed-hosts" in r.json()["detail"] and repr(host) in r.json()["detail"]
            assert app.state.server.workers["run"].peak_active == 0

    run(go())


def test_allowed_hosts_add_names_and_wildcards(trained_model) -> None:
    """--allowed-hosts adds exact names and *.domain (its subdomains only); * allows any."""
    config = {"allowed_hosts": ("charlstm.example.org", "*.lan.example")}
    expected = {
        "charlstm.example.org:443": 200,
        "box.lan.example": 200,
        "lan.example": 403,
        "example.org": 403,
        "localhost": 200,
    }
    got = {
        h: call(trained_model, "GET", "/healthz", config, headers={"Host": h}).status_code
        for h in expected
    }
    assert got == expected
    r = call(trained_model, "GET", "/healthz", {"allowed_hosts": ("*",)}, headers={"Host": "x.y"})
    assert r.status_code == 200


def test_a_cross_site_origin_is_403(trained_model) -> None:
    """A browser names the page that sent a request in Origin: a page of another site (or an
    opaque `null` origin) is refused even when the Host is localhost; the server's own page is
    served."""
    for origin, status in (
        ("http://evil.example", 403),
        ("null", 403),
        ("file://", 403),
        ("http://localhost:8000", 200),
        ("http://127.0.0.1:8000", 200),
    ):
        r = call(trained_model, "GET", "/v1/models", headers={"Origin": origin})
        assert r.status_code == status, origin
        if status == 403:
            assert f"requests from pages at {origin!r} are refused" in r.json()["detail"]
            assert "--allowed-hosts" in r.json()["detail"]


def test_a_request_without_a_host_header_is_refused() -> None:
    """HTTP/1.0 allows leaving Host out; such a request names no host this server answers to."""
    status, reason, _ = security.Guard(None).refusal({"type": "http", "path": "/", "headers": []})
    assert status == 403 and reason.startswith("no Host header is not one this server answers to")


@pytest.mark.parametrize("value", ["http://example.com", "exa mple.com", "example.com:80", ""])
def test_a_malformed_allowed_host_is_refused(value) -> None:
    with pytest.raises(UserError, match="is not a host name"):
        ServerConfig(allowed_hosts=(value,))


# ------------------------------------------------------------------------------ content type


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_a_post_that_is_not_json_is_415_before_it_is_read(trained_model, content_type) -> None:
    """The content types a web page may send to another site without asking first (and none at
    all) are refused with 415, even when the body is valid JSON."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/v1/generate", "/v1/generate/stream"):
        r = call(trained_model, "POST", path, content=json.dumps(GENERATE), headers=headers)
        assert r.status_code == 415, r.text
        assert "application/json" in r.json()["detail"]


def test_json_with_a_charset_or_a_json_suffix_is_accepted(trained_model) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        r = call(
            trained_model,
            "POST",
            "/v1/generate",
            content=json.dumps(GENERATE),
            headers={"Content-Type": content_type},
        )
        assert r.status_code == 200, (content_type, r.text)


# ------------------------------------------------------------------------------------ headers


def _csp(response: httpx.Response) -> dict[str, str]:
    policy = response.headers["Content-Security-Policy"]
    return {d.split(" ", 1)[0]: d.partition(" ")[2] for d in policy.split("; ")}


def test_every_response_carries_the_security_headers(trained_model) -> None:
    """JSON, errors (the guard's own among them), the event stream, the page and its assets all
    say nosniff and forbid framing; the page and the API may load this origin's files only."""

    async def go():
        async with serving(trained_model) as (_, client):
            return [
                await client.get("/v1/models"),
                await client.post("/v1/generate", json={"length": 0}),
                await client.post("/v1/generate/stream", json=GENERATE),
                await client.get("/"),
                await client.get("/static/app.js"),
                await client.get("/nothing"),
                await client.get("/healthz", headers={"Host": "evil.example"}),
                await client.post("/v1/generate", content=b"{}"),
            ]

    responses = run(go())
    assert [r.status_code for r in responses] == [200, 422, 200, 200, 200, 404, 403, 415]
    for r in responses:
        assert r.headers["X-Content-Type-Options"] == "nosniff", r.url
        assert r.headers["X-Frame-Options"] == "DENY"
        csp = _csp(r)
        assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'self'", r.url
        assert "script-src" not in csp and "style-src" not in csp  # 'self' only: nothing inline


def test_the_docs_inline_script_is_allowed_by_its_hash_alone(trained_model) -> None:
    """Swagger UI's page starts with one inline script: the policy names its exact hash (so no
    other inline script runs) rather than 'unsafe-inline'."""
    r = call(trained_model, "GET", "/docs")
    scripts = re.findall(r"<script>(.*?)</script>", r.text, re.DOTALL)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    csp = _csp(r)
    assert csp["script-src"] == f"'self' 'sha256-{digest}'"
    assert csp["frame-ancestors"] == "'none'"


# ------------------------------------------------------------------------------- slow clients


class SlowBody:
    """Drives the ASGI app by hand: the headers of a POST, then only part of its body."""

    def __init__(self, app) -> None:
        self.sent: asyncio.Queue = asyncio.Queue()
        first = {"type": "http.request", "body": b'{"start_text": ', "more_body": True}
        messages = [first]

        async def receive():
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the rest of the body never comes

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/generate",
            "raw_path": b"/v1/generate",
            "query_string": b"",
            "root_path": "",
            "server": ("localhost", 80),
            "client": ("127.0.0.1", 5000),
            "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
        }
        self.task = asyncio.create_task(app(scope, receive, self.sent.put))


def test_a_body_that_does_not_arrive_in_time_is_408(trained_model) -> None:
    """A client that sends its headers and then trickles (or withholds) the body is answered 408
    once `body_timeout` has passed, and nothing is generated for it."""

    async def go():
        async with serving(trained_model, body_timeout=0.2) as (app, _):
            slow = SlowBody(app)
            start = await asyncio.wait_for(slow.sent.get(), 30)
            body = await asyncio.wait_for(slow.sent.get(), 30)
            await asyncio.wait_for(slow.task, 30)
            assert start["status"] == 408
            assert "did not arrive within 0.2 s" in json.loads(body["body"])["detail"]
            assert app.state.server.used == 0

    run(go())


@contextlib.contextmanager
def real_server(app, config: ServerConfig, parser: str = "httptools"):
    """`app` behind uvicorn on a free loopback port, with the HTTP settings `serve` gives it (or
    the same deadlines over the h11 parser)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            limit_concurrency=config.connection_limit,
            http=security.protocol(config.header_timeout, parser=parser),
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(1000):
        if server.started:
            break
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(10)


def _read_until_closed(conn: socket.socket) -> bytes:
    conn.settimeout(30)  # a hang fails the test; the server's deadline is far shorter
    data = b""
    while chunk := conn.recv(4096):
        data += chunk
    return data


@pytest.mark.slow  # a real uvicorn on a loopback port
@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_slow_headers_are_cut_off_and_the_connection_limit_holds(trained_model, parser) -> None:
    """uvicorn waits for ever on half a request line; with `serve`'s protocol a connection whose
    headers are not complete within `header_timeout` is answered 408 and closed, whether it sent
    nothing, half a request, or half of its second request. Connections past `max_connections`
    are answered 503 by the HTTP server. A whole request is served as usual. The same over both
    of uvicorn's parsers."""
    config = ServerConfig(header_timeout=0.3, max_connections=3)
    app = create_app([trained_model], config)
    request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with real_server(app, config, parser) as address:
        with socket.create_connection(address) as idle:
            assert _read_until_closed(idle).startswith(b"HTTP/1.1 408 ")
        with socket.create_connection(address) as half:
            half.sendall(b"GET /healthz HTTP/1.1\r\nHost: loc")
            assert _read_until_closed(half).startswith(b"HTTP/1.1 408 ")
        with socket.create_connection(address) as kept:
            kept.sendall(request + b"GET /healthz HTTP/1.1\r\n")  # the second one half sent
            answers = _read_until_closed(kept)
            assert answers.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in answers
            assert answers.count(b"HTTP/1.1 408 ") == 1
        held = [socket.create_connection(address) for _ in range(3)]
        try:
            held[-1].sendall(request)
            assert _read_until_closed(held[-1]).startswith(b"HTTP/1.1 503 ")
        finally:
            for conn in held:
                conn.close()
        with socket.create_connection(address) as again:  # the held connections are gone
            again.sendall(request)
            assert _read_until_closed(again).startswith(b"HTTP/1.1 200 ")


@pytest.mark.slow  # a real uvicorn on a loopback port, and a stream of half a second
@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_request_half_sent_behind_a_stream_waits_for_it_to_end(
    trained_model, parser, monkeypatch
) -> None:
    """httptools parses a pipelined request while the response before it is still streaming: the
    half-sent second request's header deadline starts only once that response is complete, so
    the stream, longer than the deadline, arrives whole, and then the half request gets its 408."""
    from charlstm.serve.worker import Pace, Shard

    monkeypatch.setattr(Pace, "chars", lambda self, rows, seconds: 2)
    real_tick = Shard.tick

    def slow_tick(self):  # 2 characters every 40 ms: 60 characters take 1.2 s
        time.sleep(0.04)
        real_tick(self)

    monkeypatch.setattr(Shard, "tick", slow_tick)
    config = ServerConfig(header_timeout=0.3)
    app = create_app([trained_model], config)
    body = json.dumps({"start_text": "the ", "length": 60}).encode()
    stream = (
        b"POST /v1/generate/stream HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    with real_server(app, config, parser) as address, socket.create_connection(address) as conn:
        conn.sendall(stream + b"GET /healthz HTTP/1.1\r\n")  # the second, half sent
        time.sleep(0.1)
        conn.sendall(b"Host: loc")  # more of it, while the stream goes on
        data = _read_until_closed(conn)
    assert data.startswith(b"HTTP/1.1 200 ")
    done = data.index(b"event: done")
    assert data.count(b"HTTP/1.1 408 ") == 1 and data.index(b"HTTP/1.1 408 ") > done


# ---------------------------------------------------------------------------- serve and its CLI


@pytest.fixture
def no_listen(monkeypatch):
    """`serve` up to uvicorn.run, whose arguments are kept instead of listening."""
    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    return calls


def test_serve_gives_uvicorn_the_connection_limit_and_the_header_deadline(
    trained_run, no_listen
) -> None:
    config = ServerConfig(max_concurrency=10, header_timeout=2.5)
    app_module.serve([trained_run], config=config)
    (kw,) = no_listen
    assert kw["limit_concurrency"] == config.connection_limit == 2 * 10 + 64
    assert issubclass(kw["http"], security.HttpToolsDeadline) and kw["http"].header_timeout == 2.5
    assert kw["host"] == "127.0.0.1"


def test_serve_freezes_what_it_loaded_out_of_the_garbage_collectors_way(
    trained_run, no_listen
) -> None:
    """`serve` leaves the models, libraries and app it loaded out of Python's full collections
    (each walked 200,000 objects, the p99 time to the first text at 64 streams)."""
    import gc

    gc.unfreeze()
    try:
        app_module.serve([trained_run], config=ServerConfig())
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


@pytest.mark.parametrize(
    ("host", "keys", "warns"),
    [("0.0.0.0", (), True), ("192.168.1.5", (), True), ("0.0.0.0", (KEY,), False)]
    + [("127.0.0.1", (), False), ("localhost", (), False), ("::1", (), False)],
)
def test_serving_beyond_loopback_without_a_key_warns(trained_run, no_listen, host, keys, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        app_module.serve([trained_run], host=host, config=ServerConfig(api_keys=keys))
    messages = [str(w.message) for w in caught if "without an API key" in str(w.message)]
    assert len(messages) == int(warns), messages
    assert no_listen  # it still serves: docs/security.md says why


def test_serve_cli_takes_keys_from_flags_and_the_environment(trained_run, monkeypatch) -> None:
    """Keys come from --api-key (repeated) and CHARLSTM_API_KEY (several, separated by commas or
    spaces), and --allowed-hosts names (repeated or separated by commas), into the config."""
    configs = []
    monkeypatch.setattr(app_module, "serve", lambda runs, **kw: configs.append(kw["config"]))
    monkeypatch.setenv("CHARLSTM_API_KEY", f"{KEY}, {OTHER_KEY}")
    result = invoke("serve", trained_run, "--allowed-hosts", "a.example,*.b.example")
    assert result.exit_code == 0, result.output
    assert configs[-1].api_keys == (KEY, OTHER_KEY)
    assert configs[-1].allowed_hosts == ("a.example", "*.b.example")
    monkeypatch.delenv("CHARLSTM_API_KEY")
    third = "t" * 20
    result = invoke("serve", trained_run, "--api-key", KEY, "--api-key", third)
    assert result.exit_code == 0, result.output
    assert configs[-1].api_keys == (KEY, third)
    result = invoke("serve", trained_run, "--max-connections", "40")
    assert configs[-1].max_connections == 40 and configs[-1].api_keys == ()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--api-key", "tooshort"), "API key 1 has 8 characters"),
        (("--allowed-hosts", "http://example.com"), "is not a host name"),
        (("--max-connections", "0"), "max_connections must be >= 1"),
    ],
)
def test_serve_cli_refuses_bad_security_settings_in_one_line(trained_run, args, words) -> None:
    one_line_error(invoke("serve", trained_run, *args), words)


# ------------------------------------------------------------------------------------- the page


@pytest.fixture
def chromium(tmp_path):
    from tests.test_browser import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Chromium is not installed: apt-get install -y chromium chromium-driver")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.mark.slow  # a real server and a real browser
def test_the_page_asks_for_the_key_and_the_docs_render_under_the_policy(
    trained_model, chromium
) -> None:
    """With a key set, the page asks for it, says when the server refuses one, and with the right
    one loads the model and generates; neither the page nor /docs breaks the Content-Security-
    Policy (the browser would log each violation)."""
    from selenium.webdriver.common.by import By

    from tests.test_browser import wait

    config = ServerConfig(api_keys=(KEY,))
    app = create_app([trained_model], config)
    with real_server(app, config) as (host, port):
        chromium.get(f"http://{host}:{port}/")
        key_form = chromium.find_element(By.ID, "key-form")
        wait(chromium, key_form.is_displayed)
        chromium.find_element(By.ID, "api-key").send_keys("wrong-key-but-long-enough")
        chromium.find_element(By.ID, "use-key").click()
        key_status = chromium.find_element(By.ID, "key-status")
        wait(chromium, lambda: "refused" in key_status.text)
        chromium.find_element(By.ID, "api-key").send_keys(KEY)
        chromium.find_element(By.ID, "use-key").click()
        model_line = chromium.find_element(By.ID, "model-line")
        wait(chromium, lambda: "validation loss" in model_line.text)
        assert not key_form.is_displayed()
        chromium.find_element(By.ID, "generate").click()
        status = chromium.find_element(By.ID, "status")
        wait(chromium, lambda: "characters in" in status.text)
        assert len(chromium.find_element(By.ID, "poem").text) > 1
        chromium.get(f"http://{host}:{port}/docs")
        wait(chromium, lambda: chromium.find_elements(By.CSS_SELECTOR, ".opblock"))
        logs = chromium.get_log("browser")
    violations = [e["message"] for e in logs if "Content Security Policy" in e["message"]]
    assert not violations, violations
