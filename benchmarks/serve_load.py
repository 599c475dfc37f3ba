"""Load-test the server on loopback: streaming clients on both routes beside the engine alone, or
with hostile traffic.

    python benchmarks/serve_load.py RUN --clients 16,64,128 --routes native,openai --length 1000 \
        --start-chars 100 --requests 1000 --duration 20          # issue 23's table
    python benchmarks/serve_load.py RUN [--clients 32] [--requests 4] [--length 600] [--max-batch N]
    python benchmarks/serve_load.py RUN --duration 60 --requests 1000 --silent 8 --hostile 50 \
        --server-sndbuf 4096 --compare
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [...]

With RUN it starts `charlstm serve RUN` on a free loopback port (and stops it afterwards); with
--url it targets a server already running on this machine (loopback addresses only). Each client
sends `--requests` streaming requests one after another, each for `--length` characters with no stop
rule, so a complete text has exactly that many; no request starts after `--duration` seconds. A
route is `native` (POST /v1/generate/stream, charlstm's events) or `openai` (POST /v1/completions
with stream: true, OpenAI's events): the same generation through either dialect.

For each number of clients (one after another against one server) it first times the engine
alone in a process of its own, for as many streams of the same length, start text and temperature:
`charlstm bench generate`'s measurement (`charlstm.bench.generation.library`, best of
`--engine-repeats`). Then, per route: generated characters/s received by the clients, that over the
engine's (the share of the engine the server delivers), the route against the native one,
requests/s, p50/p99 latency (request sent to stream end), p50/p99 time to the first generated text
(not the echoed start text), and the count of 5xx answers and of failed (incomplete or refused)
requests; one JSON line per row, then a Markdown table and the verdict against issue 23's targets:
server >= 60% of the engine, p99 time to first chunk <= 150 ms, OpenAI's route within 10% of the
native one, nothing failed. The default start text is `--start-chars` characters of the model's
vocabulary; `--distinct-starts` rotates it per request, so that no two requests share its priming.
`--max-batch 1` makes the server step one stream at a time, which shows what continuous batching
gains.

Hostile traffic (issue 15, "safe to expose") runs beside those well-formed clients:

- `--silent N` clients that open streams and never read: every `--silent-interval` seconds each
  opens a connection with a tiny receive buffer, asks for `--silent-samples` samples of
  `--silent-length` characters and keeps the connection open, unread, until the end of the run.
  On loopback Linux lets a socket buffer up to 4 MB, more than such a response, so the server
  would never wait for them: `--server-sndbuf 4096` fixes its sockets' send buffer, as over a
  slow link or behind a proxy with small buffers;
- `--hostile R` malformed or hostile requests a second, in turn from `hostile_requests` (bad
  JSON, a top_k that overflows int64, fields of the wrong type, bodies too large, a wrong Host or
  Content-Type, headers that never end, a client that leaves at once, ...), each on its own
  connection.

Then it checks that the server's slots are all free again (`/healthz` streams = 0) while the silent
connections are still open, and reports what became of those connections: sent whole (they fit in
the buffers), cut by the server, or still open. `--compare` runs the same well-formed load twice,
each against a fresh server: without the hostile traffic, then with it, and prints both as a table,
with the ratio of the p99 times to first chunk (the target: at most 2).

The client speaks HTTP/1.1 over asyncio streams directly instead of through httpx: it shares the
machine's cores with the server, and a heavier client would be measured as server latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_CLIENTS, MAX_REQUESTS, MAX_DURATION = 256, 1000, 600.0
TARGET_FIRST_CHUNK_MS = 250.0
MAX_SLOWDOWN = 2.0  # p99 time to first chunk with hostile traffic / without, at most
# Issue 23's targets for the sweep: the server's chars/s at least this share of the engine's for
# the same streams, p99 time to the first chunk at most this, OpenAI's route within this of native.
TARGET_SHARE = 0.6
TARGET_SWEEP_FIRST_CHUNK_MS = 150.0
ROUTE_GAP = 0.1


@dataclass
class Result:
    status: int
    latency: float = 0.0
    first_chunk: float | None = None
    characters: int = 0
    complete: bool = False


async def read_chunked(reader: asyncio.StreamReader):
    """The pieces of an HTTP/1.1 chunked body."""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return
        yield await reader.readexactly(size)
        await reader.readline()


def post(host: str, path: str, payload: bytes, *extra: bytes) -> bytes:
    """An HTTP/1.1 POST of a JSON body, as bytes."""
    return (
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%sConnection: close\r\n\r\n"
        % (path.encode(), host.encode(), len(payload), b"".join(e + b"\r\n" for e in extra))
        + payload
    )


def sse_events(buffer: str) -> tuple[list[tuple[str | None, str]], str]:
    """The complete server-sent events in `buffer` as (event name or None, data), and the rest."""
    events = []
    while "\n\n" in buffer:
        block, buffer = buffer.split("\n\n", 1)
        name, data = None, ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
        events.append((name, data))
    return events, buffer


class NativeStream:
    """POST /v1/generate/stream: `start`, `chunk` events, then `done` with the whole samples."""

    path = "/v1/generate/stream"

    def __init__(self, body: dict, model: str | None) -> None:
        self.body, self.text, self.prompt, self.done = body, "", None, None

    def payload(self) -> bytes:
        return json.dumps(self.body).encode()

    def read(self, name: str | None, data: str) -> int:
        """Take one event; returns the characters of generated text it carried."""
        if name == "chunk":
            piece = json.loads(data)["text"]
            self.text += piece
            return len(piece)
        if name == "start":
            self.prompt = json.loads(data)["start_text"]
        elif name == "done":
            self.done = json.loads(data)
        return 0

    def complete(self) -> bool:
        return (
            self.done is not None
            and len(self.text) == self.body["length"]
            and self.done["samples"] == [self.prompt + self.text]
        )


class OpenAIStream:
    """POST /v1/completions with stream: true: `data:` chunks of choice 0, then `data: [DONE]`."""

    path = "/v1/completions"

    def __init__(self, body: dict, model: str | None) -> None:
        self.body = {
            "model": model,
            "prompt": body["start_text"],
            "max_tokens": body["length"],
            "temperature": body["temperature"],
            "seed": body["seed"],
            "stream": True,
        }
        self.text, self.reason, self.ended = "", None, False

    def payload(self) -> bytes:
        return json.dumps(self.body).encode()

    def read(self, name: str | None, data: str) -> int:
        if data == "[DONE]":
            self.ended = True
            return 0
        chunk = json.loads(data)
        if "error" in chunk:
            return 0
        choice = chunk["choices"][0]
        self.text += choice["text"]
        self.reason = choice["finish_reason"] or self.reason
        return len(choice["text"])

    def complete(self) -> bool:
        return self.ended and self.reason == "length" and len(self.text) == self.body["max_tokens"]


ROUTES = {"native": NativeStream, "openai": OpenAIStream}


async def stream_once(
    host: str, port: int, body: dict, route: str = "native", model=None
) -> Result:
    call = ROUTES[route](body, model)
    payload = call.payload()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(post(host, call.path, payload))
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        result = Result(status)
        if status != 200 or headers.get("transfer-encoding") != "chunked":
            return result
        buffer = ""
        async for piece in read_chunked(reader):
            events, buffer = sse_events(buffer + piece.decode())
            for name, data in events:
                if call.read(name, data) and result.first_chunk is None:
                    result.first_chunk = time.perf_counter() - start
        result.latency = time.perf_counter() - start
        result.characters = len(call.text)
        result.complete = call.complete()
        return result
    except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError, KeyError):
        return Result(status=0, latency=time.perf_counter() - start)
    finally:
        writer.close()


def start_text(args, number: int) -> str:
    """The start text of request `number`: `--start-text`, or with `--distinct-starts` that text
    rotated by the number (reversed for every second round of rotations), so that no two of the
    requests running at once share one, nor its priming, for up to twice its length of clients."""
    text = args.start_text
    if args.distinct_starts:
        k = number % len(text)
        text = text[k:] + text[:k]
        if number // len(text) % 2:
            text = text[::-1]
    return text


async def client(
    host: str,
    port: int,
    index: int,
    clients: int,
    args,
    deadline: float,
    route="native",
    model=None,
) -> list[Result]:
    results = []
    for k in range(args.requests):
        if time.perf_counter() >= deadline:
            break
        body = {
            "start_text": start_text(args, k * clients + index),
            "length": args.length,
            "temperature": args.temperature,
            "seed": index * MAX_REQUESTS + k,
        }
        results.append(await stream_once(host, port, body, route, model))
    return results


# ------------------------------------------------------------------------------ hostile traffic


def hostile_requests(host: str, vocab: str, vocab_size: int) -> list[tuple[str, bytes]]:
    """(name, the bytes sent) of each hostile or malformed request, sent in turn."""
    ok = {"start_text": vocab[0], "length": 50}

    def body(**fields) -> bytes:
        return post(host, "/v1/generate", json.dumps({**ok, **fields}).encode())

    def stream(**fields) -> bytes:
        return post(host, "/v1/generate/stream", json.dumps({**ok, **fields}).encode())

    deep = b"[" * 60_000 + b"]" * 60_000
    return [
        ("top_k past int64", stream(top_k=2**63)),
        ("top_k past the vocabulary", body(top_k=vocab_size + 1)),
        ("bad JSON", post(host, "/v1/generate/stream", b'{"start_text": "a", "length": ')),
        ("not an object", post(host, "/v1/generate", b"[1, 2, 3]")),
        ("nested 60,000 deep", post(host, "/v1/generate", deep)),
        ("NaN temperature", post(host, "/v1/generate", b'{"temperature": NaN}')),
        ("length as a string", body(length="50")),
        ("negative length", body(length=-1)),
        ("length past the limit", stream(length=10**9)),
        ("too many samples", body(num_samples=10**6)),
        ("seed past 2^64", body(seed=2**64)),
        ("unknown field", body(prompt="a")),
        ("unknown model", body(model="../../etc/passwd")),
        ("characters the model never saw", body(start_text="\u2603\u0000\ud7ff")),
        ("nine stop strings", body(stop=["a"] * 9)),
        ("top_p 0", body(top_p=0)),
        ("body of 100 kB", body(start_text="a" * 100_000)),
        ("Content-Length not a number", post(host, "/v1/generate", b"{}", b"Content-Length: x")),
        (
            "chunked body of 100 kB",
            b"POST /v1/generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            % host.encode()
            + b"".join(b"1000\r\n" + b" " * 4096 + b"\r\n" for _ in range(25))
            + b"0\r\n\r\n",
        ),
        ("body not UTF-8", post(host, "/v1/generate", b'{"start_text": "\xff\xfe"}')),
        (
            "text/plain body",
            post(host, "/v1/generate", json.dumps(ok).encode()).replace(
                b"application/json", b"text/plain"
            ),
        ),
        ("Host of another site", post("evil.example", "/v1/generate", json.dumps(ok).encode())),
        ("GET on a POST path", b"GET /v1/generate HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode()),
        ("path that does not exist", b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("headers that never end", b"POST /v1/generate HTTP/1.1\r\nHost: %s\r\n" % host.encode()),
        ("garbage", os.urandom(512).replace(b"\r\n", b"..") + b"\r\n\r\n"),
        ("a stream left at once", stream(length=2000, num_samples=2)),
    ]


@dataclass
class Hostile:
    sent: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)  # "status" → count, over all requests
    by_kind: dict[str, Counter] = field(default_factory=dict)


async def hostile_once(host: str, port: int, name: str, data: bytes, tally: Hostile) -> None:
    status = "no answer"
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        status = "connect failed"
    else:
        try:
            writer.write(data)
            if name == "a stream left at once":
                await writer.drain()
                status = "left"
            else:
                line = await asyncio.wait_for(reader.readline(), 30)
                status = line.split()[1].decode() if line.startswith(b"HTTP/") else "closed"
        except (TimeoutError, OSError, asyncio.IncompleteReadError, IndexError):
            status = "closed" if status == "no answer" else status
        finally:
            writer.close()
    tally.sent[name] += 1
    tally.statuses[status] += 1
    tally.by_kind.setdefault(name, Counter())[status] += 1


async def hostile_traffic(host: str, port: int, rate: float, deadline: float, cases) -> Hostile:
    tally, tasks, k = Hostile(), set(), 0
    start = time.perf_counter()
    while (now := time.perf_counter()) < deadline:
        name, data = cases[k % len(cases)]
        task = asyncio.create_task(hostile_once(host, port, name, data, tally))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        k += 1
        await asyncio.sleep(max(0.0, start + k / rate - now))
    await asyncio.gather(*tasks)
    return tally


async def silent_client(
    host: str, port: int, index: int, args, deadline: float, sockets: list
) -> None:
    """Opens streams and never reads them: a connection every `--silent-interval` seconds (the
    clients take turns, so that one opens a stream every interval / N seconds)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(index * args.silent_interval / args.silent)
    body = {
        "start_text": args.start_text * 20,
        "length": args.silent_length,
        "num_samples": args.silent_samples,
        "temperature": 1.0,
    }
    request = post(host, "/v1/generate/stream", json.dumps(body).encode())
    while time.perf_counter() < deadline:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, request)
            sockets.append(sock)
        except OSError:
            sock.close()
        await asyncio.sleep(args.silent_interval)


def silent_fates(sockets: list[socket.socket]) -> Counter:
    """What became of each unread stream, read now that the run is over: `whole` (the server sent
    it all: it fit in the buffers), `cut` (the server closed it before the end), `open` (the
    server still holds it), or `refused NNN` (not admitted: e.g. 429, every slot taken)."""
    fates = Counter()
    for sock in sockets:
        data, fate = b"", "open"
        try:
            while chunk := sock.recv(1 << 16):
                data += chunk
            fate = "cut"
        except BlockingIOError:
            pass
        except OSError:
            fate = "cut"
        status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else None
        if status not in (None, "200"):
            fate = f"refused {status}"
        elif data.endswith(b"0\r\n\r\n"):
            fate = "whole"
        fates[fate] += 1
        sock.close()
    return fates


# ---------------------------------------------------------------------------------- the run


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    values = sorted(values)
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def get_json(host: str, port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
        return json.load(r)


async def load(
    host: str,
    port: int,
    args,
    hostile: bool = True,
    clients: int | None = None,
    route: str = "native",
    model: str | None = None,
) -> dict:
    clients = clients or args.clients[0]
    start = time.perf_counter()
    deadline = start + args.duration
    silent, side = [], []
    if hostile and args.silent:
        side += [silent_client(host, port, i, args, deadline, silent) for i in range(args.silent)]
    tally = None
    if hostile and args.hostile:
        model = await asyncio.to_thread(get_json, host, port, "/v1/model")
        cases = hostile_requests(host, model["vocabulary"], model["vocab_size"])
        tally_task = asyncio.ensure_future(
            hostile_traffic(host, port, args.hostile, deadline, cases)
        )
    side_tasks = [asyncio.ensure_future(s) for s in side]
    per_client = await asyncio.gather(
        *(client(host, port, i, clients, args, deadline, route, model) for i in range(clients))
    )
    elapsed = time.perf_counter() - start
    await asyncio.gather(*side_tasks)
    if hostile and args.hostile:
        tally = await tally_task
    # The slots: all free again, while the silent clients still hold their connections unread.
    waited, streams = 0.0, None
    while waited < 30:
        streams = (await asyncio.to_thread(get_json, host, port, "/healthz"))["streams"]
        if streams == 0:
            break
        await asyncio.sleep(0.1)
        waited += 0.1
    fates = silent_fates(silent)
    results = [r for rs in per_client for r in rs]
    ok = [r for r in results if r.status == 200]
    firsts = [r.first_chunk for r in ok if r.first_chunk is not None]
    out = {
        "hostile": hostile and bool(args.silent or args.hostile),
        "route": route,
        "clients": clients,
        "requests": len(results),
        "length": args.length,
        "max_batch": args.max_batch,
        "tick_seconds": args.tick_seconds,
        "chunk_seconds": args.chunk_seconds,
        "engine_threads": args.engine_threads,
        "duration_s": round(elapsed, 2),
        "requests_per_s": round(len(ok) / elapsed, 2),
        "latency_ms_p50": ms(percentile([r.latency for r in ok], 50)),
        "latency_ms_p99": ms(percentile([r.latency for r in ok], 99)),
        "first_chunk_ms_p50": ms(percentile(firsts, 50)),
        "first_chunk_ms_p99": ms(percentile(firsts, 99)),
        "chars_per_s": round(sum(r.characters for r in ok) / elapsed),
        "errors_5xx": sum(500 <= r.status < 600 for r in results),
        "other_errors": sum(r.status != 200 and not 500 <= r.status < 600 for r in results),
        "incomplete": sum(not r.complete for r in results),
        "failed": sum(r.status != 200 or not r.complete for r in results),
        "slots_in_use_after": streams,
        "slots_free_after_s": round(waited, 1) if streams == 0 else None,
    }
    if tally is not None:
        out["hostile_sent"] = sum(tally.sent.values())
        out["hostile_statuses"] = dict(sorted(tally.statuses.items()))
        out["hostile_5xx"] = sum(n for s, n in tally.statuses.items() if s.startswith("5"))
        out["hostile_by_kind"] = {k: dict(v) for k, v in sorted(tally.by_kind.items())}
    if hostile and args.silent:
        out["silent_streams"] = len(silent)
        out["silent_fates"] = dict(sorted(fates.items()))
    p99 = out["first_chunk_ms_p99"]
    out["target_met"] = (
        out["errors_5xx"] == 0
        and out.get("hostile_5xx", 0) == 0
        and out["failed"] == 0
        and streams == 0
        and p99 is not None
        and (out["hostile"] or p99 <= TARGET_FIRST_CHUNK_MS)
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `charlstm serve ARGS...` with the send buffer of its sockets fixed at SIZE bytes (accepted sockets
# inherit the listening socket's), which turns off Linux's autotuning: on loopback that lets a
# socket buffer up to 4 MB (net.ipv4.tcp_wmem), more than any one response of the default limits,
# so an unread stream would never make the server wait. SIZE as over a slow link, or a proxy with
# small buffers.
SMALL_BUFFERS = """
import runpy, socket, sys
size = int(sys.argv.pop(1))
bind = socket.socket.bind
def bind_with_small_buffers(self, address):
    if self.type == socket.SOCK_STREAM:
        self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    return bind(self, address)
socket.socket.bind = bind_with_small_buffers
sys.argv[0] = "charlstm"
runpy.run_module("charlstm", run_name="__main__", alter_sys=True)
"""


def start_server(args, log) -> tuple[subprocess.Popen, int]:
    port = free_port()
    entry = (
        ["-c", SMALL_BUFFERS, str(args.server_sndbuf)] if args.server_sndbuf else ["-m", "charlstm"]
    )
    cmd = [
        sys.executable,
        *entry,
        "serve",
        args.run,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-concurrency",
        str(args.max_concurrency or max(64, *args.clients)),
        "--max-length",
        str(max(4000, args.length, args.silent_length)),
    ]
    if args.max_batch:
        cmd += ["--max-batch", str(args.max_batch)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for flag in ("tick_seconds", "chunk_seconds", "engine_threads"):
        if getattr(args, flag) is not None:
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"serve_load: the server exited with status {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    sys.exit("serve_load: the server did not answer /healthz within 60 s")


def server_log_counts(text: str) -> dict:
    """What the server logged: errors and tracebacks (any is a bug, or a response uvicorn saw cut
    short), responses the app cut off (slow clients)."""
    return {
        "server_errors": len(re.findall(r"^ERROR", text, re.MULTILINE)),
        "server_tracebacks": text.count("Traceback"),
        "server_cut_responses": len(re.findall(r"cut off a response", text)),
    }


@contextlib.contextmanager
def server(args, host: str, port: int | None):
    """(port, log counts) of the server to load: the running one at `port`, or a fresh server of
    RUN, stopped afterwards (then the counts of what it logged are filled in)."""
    counts: dict = {}
    if port is not None:
        yield port, counts
        return
    with tempfile.TemporaryFile("w+") as log:
        proc, port = start_server(args, log)
        try:
            yield port, counts
        finally:
            proc.terminate()
            proc.wait(30)
            log.seek(0)
            counts |= server_log_counts(log.read())


def default_start_text(host: str, port: int, args) -> None:
    """`--start-chars` characters of the model's vocabulary (its most frequent first), as the
    start text, unless `--start-text` gave one."""
    if args.start_text is None:
        vocab = get_json(host, port, "/v1/model")["vocabulary"]
        args.start_text = "".join(vocab[i % len(vocab)] for i in range(args.start_chars))


def run_once(args, host: str, port: int | None, hostile: bool) -> dict:
    """One load run; against a fresh server of RUN when `port` is None."""
    with server(args, host, port) as (live, counts):
        default_start_text(host, live, args)
        out = asyncio.run(load(host, live, args, hostile))
    return out | counts


# The engine's own speed for N streams of LENGTH characters from START, in a process of its own:
# `charlstm bench generate`'s measurement (charlstm.bench.generation.library), best of REPEATS.
ENGINE = """
import json, sys
import charlstm
from charlstm.bench.generation import library
run, n, length, temperature, start, repeats = sys.argv[1:7]
n, length, temperature, repeats = int(n), int(length), float(temperature), int(repeats)
model = charlstm.load(run, device="cpu")
library(model, n, 8, temperature, start=start)  # the kernels loaded and run once, not timed
seconds = min(library(model, n, length, temperature, start=start)[0] for _ in range(repeats))
print(json.dumps({"chars_per_s": n * length / seconds}))
"""


def engine_speed(args, streams: int) -> float:
    cmd = [sys.executable, "-c", ENGINE, args.run, str(streams), str(args.length)]
    cmd += [str(args.temperature), args.start_text, str(args.engine_repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])["chars_per_s"]


def sweep(args, host: str, port: int | None) -> list[dict]:
    """For each number of clients: the engine's speed for that many streams, then the server's
    under that many streaming clients on each route, one after the other against one server."""
    rows = []
    with server(args, host, port) as (live, counts):
        default_start_text(host, live, args)
        model = get_json(host, live, "/v1/model")["name"]
        for n in args.clients:
            engine = engine_speed(args, n) if args.run and args.engine_repeats else None
            for route in args.routes:
                row = asyncio.run(load(host, live, args, False, n, route, model))
                row["engine_chars_per_s"] = None if engine is None else round(engine)
                row["server_vs_engine"] = (
                    None if engine is None else round(row["chars_per_s"] / engine, 3)
                )
                rows.append(row)
                print(json.dumps(row, ensure_ascii=False), flush=True)
    for row in rows:
        row |= counts
    return rows


def sweep_table(rows: list[dict]) -> str:
    """The sweep as a Markdown table: per number of streams, the engine and each route."""
    header = (
        "| streams | engine chars/s | route | server chars/s | server / engine | route / native "
        "| time to first chunk p50 / p99 | requests | failed | 5xx |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    native = {r["clients"]: r["chars_per_s"] for r in rows if r["route"] == "native"}
    for r in rows:
        engine, share = r["engine_chars_per_s"], r["server_vs_engine"]
        base = native.get(r["clients"])
        engine = "-" if engine is None else f"{engine:,}"
        share = "-" if share is None else f"{share:.2f}"
        vs_native = f"{r['chars_per_s'] / base:.2f}" if base else "-"
        lines.append(
            f"| {r['clients']} | {engine} | {r['route']} | {r['chars_per_s']:,} | {share} "
            f"| {vs_native} | {r['first_chunk_ms_p50']} / {r['first_chunk_ms_p99']} ms "
            f"| {r['requests']} | {r['failed']} | {r['errors_5xx']} |"
        )
    return "\n".join(lines)


def sweep_verdict(rows: list[dict]) -> str:
    """Issue 23's targets, row by row: server >= 60% of the engine, p99 time to first chunk
    <= 150 ms, OpenAI's route within 10% of the native one, nothing failed."""
    native = {r["clients"]: r["chars_per_s"] for r in rows if r["route"] == "native"}
    out = []
    for r in rows:
        misses = []
        if r["server_vs_engine"] is not None and r["server_vs_engine"] < TARGET_SHARE:
            misses.append(f"server / engine {r['server_vs_engine']:.2f} < {TARGET_SHARE}")
        p99 = r["first_chunk_ms_p99"]
        if p99 is None or p99 > TARGET_SWEEP_FIRST_CHUNK_MS:
            misses.append(f"p99 first chunk {p99} ms > {TARGET_SWEEP_FIRST_CHUNK_MS:g}")
        base = native.get(r["clients"])
        if r["route"] != "native" and base and r["chars_per_s"] < (1 - ROUTE_GAP) * base:
            misses.append(f"{r['route']} / native {r['chars_per_s'] / base:.2f}")
        if r["failed"] or r["errors_5xx"] or r.get("server_errors") or r.get("server_tracebacks"):
            misses.append("failures")
        verdict = "met" if not misses else "missed: " + "; ".join(misses)
        out.append(f"{r['clients']} streams, {r['route']}: {verdict}")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    """The runs side by side, as a Markdown table."""
    header = (
        "| traffic | well-formed requests | failed | 5xx (well-formed / hostile) | p50 / p99 "
        "time to first chunk | p99 latency | chars/s | hostile requests (answers) | unread "
        "streams (sent whole / cut / open) | slots in use after |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fates = r.get("silent_fates", {})
        lines.append(
            f"| {'with hostile traffic' if r['hostile'] else 'well-formed only'} "
            f"| {r['requests']} | {r['failed']} | {r['errors_5xx']} / {r.get('hostile_5xx', '-')} "
            f"| {r['first_chunk_ms_p50']} / {r['first_chunk_ms_p99']} ms "
            f"| {r['latency_ms_p99']} ms | {r['chars_per_s']:,} "
            f"| {r.get('hostile_sent', '-')} "
            + (
                f"({', '.join(f'{n} × {s}' for s, n in r['hostile_statuses'].items())})"
                if "hostile_statuses" in r
                else ""
            )
            + f" | {r.get('silent_streams', '-')}"
            + (
                f" ({fates.get('whole', 0)} / {fates.get('cut', 0)} / {fates.get('open', 0)}"
                + "".join(f"; {n} {f}" for f, n in fates.items() if f.startswith("refused"))
                + ")"
                if fates
                else ""
            )
            + f" | {r['slots_in_use_after']} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="run folder to serve (or give --url)")
    p.add_argument("--url", help="a server already running on loopback, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--clients",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[32],
        help="streaming clients at once; several, separated by commas, to sweep: 16,64,128",
    )
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--length", type=int, default=600)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--start-text", default=None, help="default: --start-chars of the vocabulary")
    p.add_argument(
        "--start-chars",
        type=int,
        default=1,
        help="length of the default start text: the model's characters in order (most frequent "
        "first)",
    )
    p.add_argument(
        "--distinct-starts",
        action="store_true",
        help="rotate the start text by the request's number, so that no two requests share one",
    )
    p.add_argument("--duration", type=float, default=120.0, help="no request starts after this")
    p.add_argument(
        "--routes",
        type=lambda v: v.split(","),
        default=["native"],
        help="native (POST /v1/generate/stream), openai (POST /v1/completions, stream), or both: "
        "native,openai; with several, or several --clients, it sweeps and prints a table",
    )
    p.add_argument(
        "--engine-repeats",
        type=int,
        default=3,
        help="the sweep times the engine alone (charlstm bench generate's measurement) for each "
        "number of clients, best of this many; 0 leaves it out",
    )
    p.add_argument("--max-batch", type=int, help="passed to the server it starts")
    p.add_argument("--max-concurrency", type=int, help="passed to the server it starts")
    p.add_argument("--threads", type=int, help="passed to the server it starts")
    p.add_argument("--tick-seconds", type=float, help="passed to the server it starts")
    p.add_argument("--chunk-seconds", type=float, help="passed to the server it starts")
    p.add_argument("--engine-threads", type=int, help="passed to the server it starts")
    p.add_argument(
        "--server-sndbuf",
        type=int,
        help="bytes: the send buffer of the server's sockets (default: the system's autotuning)",
    )
    p.add_argument("--silent", type=int, default=0, help="clients that open streams, never read")
    p.add_argument(
        "--silent-interval", type=float, default=10.0, help="seconds between a client's streams"
    )
    p.add_argument("--silent-samples", type=int, default=4)
    p.add_argument("--silent-length", type=int, default=4000)
    p.add_argument("--hostile", type=float, default=0.0, help="malformed requests per second")
    p.add_argument(
        "--compare", action="store_true", help="also run without the hostile traffic, first"
    )
    args = p.parse_args()
    if not all(1 <= n <= MAX_CLIENTS for n in args.clients):
        p.error(f"--clients must be in [1, {MAX_CLIENTS}]")
    if not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--requests must be in [1, {MAX_REQUESTS}]")
    if not 0 < args.duration <= MAX_DURATION:
        p.error(f"--duration must be in (0, {MAX_DURATION:g}]")
    if not 0 <= args.silent <= MAX_CLIENTS or not 0 <= args.hostile <= 1000:
        p.error(f"--silent must be in [0, {MAX_CLIENTS}] and --hostile in [0, 1000]")
    if args.silent and not args.silent_interval > 0:
        p.error("--silent-interval must be > 0")
    if not set(args.routes) <= set(ROUTES) or not args.routes:
        p.error(f"--routes takes {', '.join(ROUTES)}, separated by commas")
    if args.start_chars < 1 or (args.start_text is not None and not args.start_text):
        p.error("the start text must have at least one character")
    hostile = args.compare or args.silent or args.hostile
    if hostile and (len(args.clients) > 1 or args.routes != ["native"]):
        p.error("the hostile runs take one --clients and the native route")
    if bool(args.run) == bool(args.url):
        p.error("give a RUN folder to serve or the --url of a running server, not both")
    if args.url and (
        args.max_batch
        or args.max_concurrency
        or args.server_sndbuf
        or args.threads
        or args.tick_seconds is not None
        or args.chunk_seconds is not None
        or args.engine_threads is not None
    ):
        p.error(
            "--max-batch, --max-concurrency, --threads, --tick-seconds, --chunk-seconds, "
            "--engine-threads and "
            "--server-sndbuf apply to a server it "
            "starts"
        )
    host, port = "127.0.0.1", None
    if args.url:
        parts = urlsplit(args.url)
        if parts.hostname not in LOOPBACK:
            p.error("--url must be a loopback address (127.0.0.1, localhost, ::1)")
        host, port = parts.hostname, parts.port or 80
    elif not os.path.exists(args.run):
        p.error(f"no run folder {args.run!r}")
    if not hostile and (len(args.clients) > 1 or len(args.routes) > 1 or args.engine_repeats):
        rows = sweep(args, host, port)
        print(sweep_table(rows))
        print(sweep_verdict(rows))
        return
    rows = []
    for with_hostile in [False, True] if args.compare else [True]:
        rows.append(run_once(args, host, port, with_hostile))
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    if hostile:
        print(table(rows))
    if args.compare:
        base, loaded = rows[0]["first_chunk_ms_p99"], rows[1]["first_chunk_ms_p99"]
        ratio = loaded / base if base and loaded is not None else math.inf
        met = rows[1]["target_met"] and ratio <= MAX_SLOWDOWN
        print(
            f"p99 time to first chunk, hostile / well-formed only: {ratio:.2f} (target <= "
            f"{MAX_SLOWDOWN:g}); target met: {met}"
        )


if __name__ == "__main__":
    main()
