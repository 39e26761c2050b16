"""Load on `serinus serve`: N concurrent clients on loopback, each sending fixture clips for a
fixed time, batched (--max-batch 8) against one-at-a-time (--max-batch 1), alternating; then
clients that outrun a small queue. Every answer is checked against `transcribe()` of the same clip.

    flock /tmp/serinus-cpu.lock python benchmarks/serve_load.py            # the table in docs/serve.md
    python benchmarks/serve_load.py --seconds 5 --clients 1,8              # a quick look

Per run: requests answered per second, seconds of audio transcribed per second, latency p50/p99,
and the counts of wrong answers, lost requests (no HTTP answer) and 503s. The overrun run also
reports the server's peak resident memory, sampled from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "nemo"
CLIPS = ["en_01", "en_02", "en_03", "de_01", "de_02", "es_01", "es_02", "fr_01", "fr_02"]


BOUNDARY = "serinus-load-boundary"


@dataclass
class Clip:
    name: str
    lang: str
    body: bytes  # the whole multipart request body, built once so that the clients stay light
    seconds: float
    text: str


def multipart_body(name: str, lang: str, data: bytes) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in (("model", "m"), ("language", lang))]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}.wav"\r\n'
                 f"Content-Type: audio/wav\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


@dataclass
class Result:
    latencies: list = field(default_factory=list)
    audio_seconds: float = 0.0
    wrong: int = 0
    lost: int = 0
    rejected: int = 0
    elapsed: float = 0.0
    errors: dict = field(default_factory=dict)  # lost requests by exception


def load_clips(model_path: Path) -> list[Clip]:
    """The fixture clips and what transcribe() makes of each, alone."""
    from serinus.audio import load_audio
    from serinus.checkpoint import load_model
    from serinus.transcribe import transcribe

    model = load_model(str(model_path))
    clips = []
    for name in CLIPS:
        path = FIXTURES / "audio" / f"{name}.wav"
        lang = name[:2]
        text = transcribe(model, [str(path)], source_lang=lang, target_lang=lang)[0].text
        clips.append(Clip(name, lang, multipart_body(name, lang, path.read_bytes()), len(load_audio(path)) / 16000, text))
    return clips


class Server:
    def __init__(self, model: Path, *args: str, threads: int | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen([sys.executable, "-m", "serinus.cli", "serve", "--model", str(model),
                                      "--port", str(self.port), "--log-level", "warning", *args], env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


async def client(k: int, url: str, clips: list[Clip], deadline: float, result: Result, retry_sleep: float):
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    async with httpx.AsyncClient(timeout=120) as http:
        n = k
        while time.monotonic() < deadline:
            clip = clips[n % len(clips)]
            n += 1
            start = time.monotonic()
            try:
                r = await http.post(f"{url}/v1/audio/transcriptions", content=clip.body, headers=headers)
            except httpx.HTTPError as e:
                result.lost += 1
                result.errors[type(e).__name__] = result.errors.get(type(e).__name__, 0) + 1
                continue
            if r.status_code == 503:
                result.rejected += 1
                await asyncio.sleep(retry_sleep)  # an impatient client: retries at once, not after Retry-After
                continue
            if r.status_code != 200 or r.json()["text"] != clip.text:
                result.wrong += 1
                continue
            result.latencies.append(time.monotonic() - start)
            result.audio_seconds += clip.seconds


async def load(url: str, clips: list[Clip], n_clients: int, seconds: float, retry_sleep: float = 0.05) -> Result:
    result = Result()
    start = time.monotonic()
    await asyncio.gather(*(client(k, url, clips, start + seconds, result, retry_sleep) for k in range(n_clients)))
    result.elapsed = time.monotonic() - start
    return result


def row(label: str, n: int, r: Result, extra: str = "") -> str:
    lat = np.array(r.latencies) * 1000 if r.latencies else np.array([np.nan])
    return (f"| {label} | {n} | {len(r.latencies) / r.elapsed:.1f} | {r.audio_seconds / r.elapsed:.1f} | "
            f"{np.percentile(lat, 50):.0f} | {np.percentile(lat, 99):.0f} | {len(r.latencies)} | {r.wrong} | "
            f"{r.lost}{' ' + str(r.errors) if r.errors else ''} | {r.rejected} |{extra}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(FIXTURES / "tiny_canary2_v2style.nemo"))
    p.add_argument("--seconds", type=float, default=15, help="load time per run")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--overrun-clients", type=int, default=64)
    p.add_argument("--overrun-queue", type=int, default=8)
    p.add_argument("--server-threads", type=int, default=0,
                   help="OMP_NUM_THREADS of the server (0: torch's default); the clients need a core too")
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    clips = load_clips(Path(args.model))
    print(f"model {Path(args.model).name}; clips: {len(clips)} fixture clips, "
          f"{sum(c.seconds for c in clips) / len(clips):.1f} s each on average; {args.seconds:g} s per run; "
          f"{os.cpu_count()} CPUs, torch threads in the server: "
          f"{args.server_threads or 'default'}\n")
    print("| server | clients | requests/s | audio s/s | p50 ms | p99 ms | answered | wrong | lost | 503 | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    # Both servers stay up and the runs alternate between them, so that a change in the machine's
    # load during the benchmark hits both alike.
    servers = {f"batched (--max-batch {args.max_batch})": Server(Path(args.model), "--max-batch", str(args.max_batch),
                                                                 threads=args.server_threads),
               "one at a time (--max-batch 1)": Server(Path(args.model), "--max-batch", "1",
                                                       threads=args.server_threads)}
    try:
        for n in clients:
            for label, server in servers.items():
                r = asyncio.run(load(server.url, clips, n, args.seconds))
                largest = httpx.get(f"{server.url}/health").json()["largest_batch"]
                print(row(label, n, r, f" largest batch so far {largest} |"), flush=True)
    finally:
        for server in servers.values():
            server.stop()

    server = Server(Path(args.model), "--max-batch", str(args.max_batch), "--queue", str(args.overrun_queue),
                    threads=args.server_threads)
    peak = [server.rss_mb()]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.2):
            peak.append(server.rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = asyncio.run(load(server.url, clips, args.overrun_clients, args.seconds))
        stop.set()
        sampler.join()
        healthy = httpx.get(f"{server.url}/health").json()
        print(row(f"overrun (--queue {args.overrun_queue})", args.overrun_clients, r,
                  f" RSS {peak[0]:.0f} MB at start, peak {max(peak):.0f} MB; /health after: {healthy['status']} |"))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
