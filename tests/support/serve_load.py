"""Load and soak figures for ``python -m infer serve`` (traffic to 127.0.0.1 only; bounded in count and time).

    python -m tests.support.serve_load --exact-clients 32 --throughput-files 16 --soak 500

1. exactness: ``--exact-clients`` concurrent clients, durations spread over 1–60 s, against
   ``Qwen3ASRModel.transcribe`` of the same files with the same options;
2. throughput: the same ``--throughput-files`` files one client at a time, then with ``--concurrency`` clients:
   audio-seconds per second, p50/p95 latency, time to first token (first SSE delta);
3. soak: ``--soak`` requests at ``--concurrency``, every tenth a bad upload: every good answer must be its own
   file's text, every bad one a 400; the server's RSS at the start and after each of --soak-rounds rounds.

The model is the small random-weight test checkpoint unless ``--model`` names one. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np

from tests.support.server import read_metric, running_server, speech_files


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def heap_in_use_mib(url: str) -> float | None:
    """The server's malloc bytes in use (its /metrics ``qasr_heap_bytes{kind="in_use"}``), in MiB."""
    value = read_metric(url, 'qasr_heap_bytes{kind="in_use"}')
    return None if value is None else round(value / 2**20, 1)


def request(url: str, data: bytes, name: str, stream: bool, deadline: float) -> dict:
    """One transcription; returns status, text, latency and time to first token (streamed requests)."""
    start = time.monotonic()
    first = None
    fields = {"language": "en", "stream": "true"} if stream else {}
    timeout = max(1.0, deadline - start)
    with httpx.stream("POST", url, files={"file": (name, data)}, data=fields, timeout=timeout) as response:
        if not stream or response.status_code != 200:
            body = response.read()
            text = json.loads(body)["text"] if response.status_code == 200 else None
        else:
            text = None
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] == "transcript.text.delta" and first is None:
                    first = time.monotonic() - start
                elif event["type"] == "transcript.text.done":
                    text = event["text"]
    return {"status": response.status_code, "text": text, "latency": time.monotonic() - start, "ttft": first}


def run_many(
    url: str, items: list[tuple[bytes, str]], concurrency: int, stream: bool, deadline: float
) -> list[dict]:
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda item: request(url, item[0], item[1], stream, deadline), items))


def summary(results: list[dict], seconds: float, audio_seconds: float) -> dict:
    latencies = np.array([r["latency"] for r in results])
    ttft = np.array([r["ttft"] for r in results if r["ttft"] is not None])
    return {
        "wall_s": round(seconds, 2),
        "audio_s_per_s": round(audio_seconds / seconds, 2),
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
        "latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3) if len(ttft) else None,
        "ttft_p95_s": round(float(np.percentile(ttft, 95)), 3) if len(ttft) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--exact-clients", type=int, default=32)
    parser.add_argument("--throughput-files", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--soak", type=int, default=500)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--max-chunk-seconds", type=float, default=20.0)
    parser.add_argument("--soak-rounds", type=int, default=5, help="RSS is read after each round of the soak")
    parser.add_argument("--heap-trim-every", type=int, default=None, help="the server's option (default its own)")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="seconds for the whole run")
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit
    if args.model is None:
        from tests.test_asr import cached_small_checkpoint

        args.model = cached_small_checkpoint()
    options = [
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--max-chunk-seconds",
        str(args.max_chunk_seconds),
    ]
    server_args = [
        "--max-batch",
        str(args.concurrency),
        "--max-queue",
        "256",
        "--max-audio-seconds",
        "90",
        *options,
    ]
    if args.heap_trim_every is not None:
        server_args += ["--heap-trim-every", str(args.heap_trim_every)]
    report: dict = {"load_average_start": os.getloadavg()}
    rng = np.random.default_rng(0)
    exact_durations = [float(d) for d in np.round(rng.uniform(1, 60, args.exact_clients), 1)]
    throughput_durations = [float(d) for d in np.round(rng.uniform(1, 20, args.throughput_files), 1)]
    exact_paths = speech_files(exact_durations)
    throughput_paths = speech_files(throughput_durations)

    from qasr_jax.asr import Qwen3ASRModel

    with running_server(args.model, *server_args) as server:
        url = server.url + "/v1/audio/transcriptions"
        report["rss_mib_ready"] = round(rss_mib(server.process.pid), 1)
        # 1. exactness
        if exact_paths:
            items = [(Path(p).read_bytes(), os.path.basename(p)) for p in exact_paths]
            start = time.monotonic()
            results = run_many(url, items, len(items), False, deadline)
            served = [r["text"] for r in results]
            exact_wall = time.monotonic() - start
            reference = Qwen3ASRModel.from_pretrained(args.model, max_new_tokens=args.max_new_tokens,
                                                      max_chunk_seconds=args.max_chunk_seconds)  # fmt: skip
            expected = [r.text for r in reference.transcribe(exact_paths)]
            report["exactness"] = {
                "clients": len(items), "durations_s": [min(exact_durations), max(exact_durations)],
                "identical": sum(a == b for a, b in zip(served, expected)), "wall_s": round(exact_wall, 2),
            }  # fmt: skip
        # 2. throughput: warm the shapes once, then one at a time vs concurrent
        items = [(Path(p).read_bytes(), os.path.basename(p)) for p in throughput_paths]
        audio_seconds = sum(throughput_durations)
        # Warm: the prefill shapes that one-at-a-time and concurrent arrivals make are compiled before timing.
        run_many(url, items, 1, True, deadline)
        run_many(url, items, args.concurrency, True, deadline)
        start = time.monotonic()
        one = run_many(url, items, 1, True, deadline)
        single = summary(one, time.monotonic() - start, audio_seconds)
        start = time.monotonic()
        many = run_many(url, items, args.concurrency, True, deadline)
        concurrent_ = summary(many, time.monotonic() - start, audio_seconds)
        report["throughput"] = {
            "files": len(items), "audio_s": round(audio_seconds, 1), "one_at_a_time": single,
            f"{args.concurrency}_concurrent": concurrent_,
            "speedup": round(concurrent_["audio_s_per_s"] / single["audio_s_per_s"], 2),
            "same_text": [r["text"] for r in one] == [r["text"] for r in many],
        }  # fmt: skip
        # 3. soak
        if args.soak:
            plain = run_many(
                url, items, args.concurrency, False, deadline
            )  # the soak's requests are not streamed
            truth = {i: r["text"] for i, r in enumerate(plain)}
            plan = []
            for n in range(args.soak):
                if n % 10 == 9:
                    plan.append((bytes(rng.integers(0, 256, 2000, dtype=np.uint8)), f"bad{n}.wav", None))
                else:
                    i = int(rng.integers(len(items)))
                    plan.append((items[i][0], f"{i}.wav", i))
            # In rounds, the server's RSS after each (read 1 s after the round's last answer, once the server
            # is idle): a leak climbs round after round, warm-up does not.
            time.sleep(1.0)
            rss = [round(rss_mib(server.process.pid), 1)]
            heap = [heap_in_use_mib(server.url)]
            start = time.monotonic()
            results, size = [], -(-len(plan) // args.soak_rounds)
            for first in range(0, len(plan), size):
                part = [(d, n) for d, n, _ in plan[first : first + size]]
                results += run_many(url, part, args.concurrency, False, deadline)
                time.sleep(1.0)
                rss.append(round(rss_mib(server.process.pid), 1))
                heap.append(heap_in_use_mib(server.url))
            ok = bad = wrong = 0
            for (_, _, i), r in zip(plan, results):
                if i is None:
                    bad += r["status"] == 400
                elif r["status"] == 200 and r["text"] == truth[i]:
                    ok += 1
                else:
                    wrong += 1
            report["soak"] = {
                "requests": len(plan), "good_correct": ok, "bad_rejected_400": bad, "lost_or_crossed": wrong,
                "wall_s": round(time.monotonic() - start, 1),
                "rss_mib_start": rss[0], "rss_mib_end": rss[-1], "rss_mib_after_each_round": rss[1:],
                "heap_in_use_mib_start": heap[0], "heap_in_use_mib_after_each_round": heap[1:],
                "heap_trims": read_metric(server.url, "qasr_heap_trims_total"),
                "heap_trim_seconds": read_metric(server.url, "qasr_heap_trim_seconds_total"),
            }  # fmt: skip
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
