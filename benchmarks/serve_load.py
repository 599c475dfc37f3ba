"""Load-test the server: N concurrent streaming clients on loopback, one JSON line of figures.

    python benchmarks/serve_load.py RUN [--clients 32] [--requests 4] [--length 600] [--max-batch N]
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

The client speaks HTTP/1.1 over asyncio streams directly instead of through httpx: it shares the
machine's cores with the server, and a heavier client would be measured as server latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_CLIENTS, MAX_REQUESTS, MAX_DURATION = 256, 1000, 600.0
TARGET_FIRST_CHUNK_MS = 250.0


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


async def stream_once(host: str, port: int, body: dict) -> Result:
    payload = json.dumps(body).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /v1/generate/stream HTTP/1.1\r\nHost: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (host.encode(), len(payload)) + payload
        )
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


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    values = sorted(values)
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


async def load(host: str, port: int, args) -> dict:
    start = time.perf_counter()
    deadline = start + args.duration
    per_client = await asyncio.gather(
        *(client(host, port, i, args, deadline) for i in range(args.clients))
    )
    elapsed = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    ok = [r for r in results if r.status == 200]
    firsts = [r.first_chunk for r in ok if r.first_chunk is not None]
    out = {
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
    }
    p99 = out["first_chunk_ms_p99"]
    out["target_met"] = (
        out["errors_5xx"] == 0
        and out["incomplete"] == 0
        and p99 is not None
        and p99 <= TARGET_FIRST_CHUNK_MS
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "charlstm",
        "serve",
        args.run,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-concurrency",
        str(max(64, args.clients)),
        "--max-length",
        str(max(4000, args.length)),
    ]
    if args.max_batch:
        cmd += ["--max-batch", str(args.max_batch)]
    proc = subprocess.Popen(cmd)
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
    args = p.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--clients must be in [1, {MAX_CLIENTS}] and --requests in [1, {MAX_REQUESTS}]")
    if not 0 < args.duration <= MAX_DURATION:
        p.error(f"--duration must be in (0, {MAX_DURATION:g}]")
    if bool(args.run) == bool(args.url):
        p.error("give a RUN folder to serve or the --url of a running server, not both")
    if args.url and args.max_batch:
        p.error("--max-batch applies to a server this script starts")
    proc = None
    if args.url:
        parts = urlsplit(args.url)
        if parts.hostname not in LOOPBACK:
            p.error("--url must be a loopback address (127.0.0.1, localhost, ::1)")
        host, port = parts.hostname, parts.port or 80
    else:
        if not os.path.exists(args.run):
            p.error(f"no run folder {args.run!r}")
        proc, port = start_server(args)
        host = "127.0.0.1"
    try:
        if args.start_text is None:
            with urllib.request.urlopen(f"http://{host}:{port}/v1/model", timeout=5) as r:
                args.start_text = json.load(r)["vocabulary"][0]
        print(json.dumps(asyncio.run(load(host, port, args)), ensure_ascii=False), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
