"""Load-test the server on loopback: streaming clients, with or without hostile traffic.

    python benchmarks/serve_load.py RUN [--clients 32] [--requests 4] [--length 600] [--max-batch N]
    python benchmarks/serve_load.py RUN --duration 60 --requests 1000 --silent 8 --hostile 50 \
        --server-sndbuf 4096 --compare
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [...]

With RUN it starts `charlstm serve RUN` on a free loopback port (and stops it afterwards); with
--url it targets a server already running on this machine (loopback addresses only). Each client
sends `--requests` streaming requests one after another, each for `--length` characters with no stop
rule, so a complete text has exactly that many; no request starts after `--duration` seconds.

Prints requests/s, p50/p99 latency (request sent to stream end), p50/p99 time to the first `chunk`
event (generated text, not the echoed start text), generated characters/s, the count of 5xx answers
and of incomplete texts, and whether the target is met: zero 5xx, every text complete, p99 time to
first chunk <= 250 ms. `--max-batch 1` makes the server step one stream at a time, which shows what
continuous batching gains.

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


async def stream_once(host: str, port: int, body: dict) -> Result:
    payload = json.dumps(body).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(post(host, "/v1/generate/stream", payload))
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        result = Result(status)
        if status != 200 or headers.get("transfer-encoding") != "chunked":
            return result
        buffer, text, done = "", "", None
        async for piece in read_chunked(reader):
            buffer += piece.decode()
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                event_line, data_line = block.split("\n", 1)
                event, data = event_line[len("event: ") :], json.loads(data_line[len("data: ") :])
                if event == "start":
                    prompt = data["start_text"]
                elif event == "chunk":
                    if result.first_chunk is None:
                        result.first_chunk = time.perf_counter() - start
                    text += data["text"]
                elif event == "done":
                    done = data
        result.latency = time.perf_counter() - start
        result.characters = len(text)
        result.complete = (
            done is not None and len(text) == body["length"] and done["samples"] == [prompt + text]
        )
        return result
    except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
        return Result(status=0, latency=time.perf_counter() - start)
    finally:
        writer.close()


async def client(host: str, port: int, index: int, args, deadline: float) -> list[Result]:
    results = []
    for k in range(args.requests):
        if time.perf_counter() >= deadline:
            break
        body = {
            "start_text": args.start_text,
            "length": args.length,
            "temperature": args.temperature,
            "seed": index * MAX_REQUESTS + k,
        }
        results.append(await stream_once(host, port, body))
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


async def load(host: str, port: int, args, hostile: bool = True) -> dict:
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
        *(client(host, port, i, args, deadline) for i in range(args.clients))
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
        "clients": args.clients,
        "requests": len(results),
        "length": args.length,
        "max_batch": args.max_batch,
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
        str(args.max_concurrency or max(64, args.clients)),
        "--max-length",
        str(max(4000, args.length, args.silent_length)),
    ]
    if args.max_batch:
        cmd += ["--max-batch", str(args.max_batch)]
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


def run_once(args, host: str, port: int | None, hostile: bool) -> dict:
    """One load run; against a fresh server of RUN when `port` is None."""
    if port is not None:
        return asyncio.run(load(host, port, args, hostile))
    with tempfile.TemporaryFile("w+") as log:
        proc, port = start_server(args, log)
        try:
            if args.start_text is None:
                with urllib.request.urlopen(f"http://{host}:{port}/v1/model", timeout=5) as r:
                    args.start_text = json.load(r)["vocabulary"][0]
            out = asyncio.run(load(host, port, args, hostile))
        finally:
            proc.terminate()
            proc.wait(30)
        log.seek(0)
        out |= server_log_counts(log.read())
    return out


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
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--length", type=int, default=600)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument(
        "--start-text", default=None, help="default: the model's most frequent character"
    )
    p.add_argument("--duration", type=float, default=120.0, help="no request starts after this")
    p.add_argument("--max-batch", type=int, help="passed to the server it starts")
    p.add_argument("--max-concurrency", type=int, help="passed to the server it starts")
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
    if not 1 <= args.clients <= MAX_CLIENTS or not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--clients must be in [1, {MAX_CLIENTS}] and --requests in [1, {MAX_REQUESTS}]")
    if not 0 < args.duration <= MAX_DURATION:
        p.error(f"--duration must be in (0, {MAX_DURATION:g}]")
    if not 0 <= args.silent <= MAX_CLIENTS or not 0 <= args.hostile <= 1000:
        p.error(f"--silent must be in [0, {MAX_CLIENTS}] and --hostile in [0, 1000]")
    if args.silent and not args.silent_interval > 0:
        p.error("--silent-interval must be > 0")
    if bool(args.run) == bool(args.url):
        p.error("give a RUN folder to serve or the --url of a running server, not both")
    if args.url and (args.max_batch or args.max_concurrency or args.server_sndbuf):
        p.error("--max-batch, --max-concurrency and --server-sndbuf apply to a server it starts")
    host, port = "127.0.0.1", None
    if args.url:
        parts = urlsplit(args.url)
        if parts.hostname not in LOOPBACK:
            p.error("--url must be a loopback address (127.0.0.1, localhost, ::1)")
        host, port = parts.hostname, parts.port or 80
        if args.start_text is None:
            with urllib.request.urlopen(f"http://{host}:{port}/v1/model", timeout=5) as r:
                args.start_text = json.load(r)["vocabulary"][0]
    elif not os.path.exists(args.run):
        p.error(f"no run folder {args.run!r}")
    rows = []
    for hostile in [False, True] if args.compare else [True]:
        rows.append(run_once(args, host, port, hostile))
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    if args.compare or args.silent or args.hostile:
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
