"""Load test of `bitllm serve` on loopback: 1, 4 and 16 concurrent streaming clients, and a soak mode.

    python benchmarks/serve_load.py                       # 1/4/16 clients, 15 s each
    python benchmarks/serve_load.py --soak 120 --clients 16 --malformed 0.1

The server runs as a `bitllm serve` subprocess (its own process, as in production) on a random
ternary llama (hidden 512, FFN 1536, 4 layers by default; random weights do not change the speed).
Clients are asyncio + httpx in this process; each sends streaming chat requests back to back.
Per level it prints aggregate generated tok/s, p50/p99 time to first token, p50/p99 inter-token
latency, errors, and the engine's batch sizes read from /metrics (the histogram's change over the
level), so batching is seen, not assumed. The soak mode mixes in malformed requests and clients
that hang up early, then requires 0 server errors (5xx), every well-formed request answered, and
no KV cache slot left open. Results: benchmarks/results/serve_load_h{hidden}_l{layers}.json (or serve_soak.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_table, loadavg, machine_line, roofline_gbs, write_results  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["Shall I compare thee to a summer's day?", "The quick brown fox", "A ternary weight is",
           "In the beginning was the word", "Binary weights are plus or minus one", "0123456789"]


def build_model(directory: Path, hidden: int, layers: int, ffn: int) -> Path:
    import bitllm
    from bitllm.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama", vocab_size=320, hidden=hidden, layers=layers, embed_std=1.0,
                       intermediate_size=ffn, max_position_embeddings=2048)
    bitllm.quantize_(model, bitllm.config_for("ternary"))
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    bitllm.save_pretrained(model, directory, "i2", tokenizer=tok)
    return directory


def engine_baseline(model: Path, threads: int, sizes: list[int], tokens: int, reps: int = 5,
                    kv_dtype: str = "f32") -> dict[int, float]:
    """Generated tok/s of the engine's own Batch at each batch size (no HTTP): the ceiling the server
    shares its steps toward. Median of `reps` runs after a warm-up."""
    import bitllm

    llm = bitllm.LLM(model, threads=threads, kv_dtype=kv_dtype)
    out = {}
    for n in sizes:
        rates = []
        for rep in range(reps + 1):
            b = llm.batch()
            for i in range(n):
                b.add(llm.encode(PROMPTS[i % len(PROMPTS)]),
                      llm.sampling_params(max_new_tokens=tokens, temperature=0.8, seed=i, ignore_eos=True))
            b.step()  # prefill (not timed: the rate is decode)
            t0, steps = time.perf_counter(), 0
            while b.live:
                b.step()
                steps += 1
            if rep:  # the first run is the warm-up
                rates.append(n * steps / (time.perf_counter() - t0))
        out[n] = statistics.median(rates)
    del llm
    return out


def start_server(model: Path, port: int, threads: int, max_batch: int, kv_dtype: str = "f32") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bitllm.cli", "serve", str(model), "--port", str(port), "--threads", str(threads),
           "--max-batch", str(max_batch), "--max-queue", "256", "--timeout", "120", "--kv-dtype", kv_dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 120 s")


def stop_server(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or ""


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def batch_sizes(before: dict, after: dict) -> dict:
    """Engine steps and their batch sizes during a level: mean and the histogram's change."""
    steps = after["bitllm_batch_size_count"] - before.get("bitllm_batch_size_count", 0)
    total = after["bitllm_batch_size_sum"] - before.get("bitllm_batch_size_sum", 0)
    hist, prev = {}, 0.0
    for key in sorted((k for k in after if k.startswith("bitllm_batch_size_bucket")),
                      key=lambda k: float(re.search(r'le="([^"]+)"', k).group(1).replace("+Inf", "inf"))):
        cum = after[key] - before.get(key, 0)
        hist[re.search(r'le="([^"]+)"', key).group(1)] = cum - prev
        prev = cum
    return {"steps": steps, "mean": total / steps if steps else 0.0, "hist": {k: v for k, v in hist.items() if v}}


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one when pid is None), from /proc."""
    import os

    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, hang_up_after: int | None = None) -> dict:
    """One streaming chat request: TTFT, per-chunk gaps and arrival times, tokens (from the usage
    chunk), status."""
    t0 = time.perf_counter()
    first, last, gaps, tokens, done, chunks, times = None, None, [], 0, False, 0, []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "ok": False}
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            msg = json.loads(data)
            if "error" in msg:
                return {"status": 500, "ok": False, "error": msg["error"]["message"]}
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            if msg["choices"] and msg["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                times.append(now)
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    return {"status": 200, "ok": True, "hung_up": True}
    return {"status": 200, "ok": done, "ttft": (first or time.perf_counter()) - t0, "gaps": gaps, "tokens": tokens,
            "times": times,
            "itl": (last - first) / max(1, tokens - 1) if first is not None and last is not None else None}


async def run_level(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """`clients` workers send requests back to back for `seconds`; in-flight requests then finish.
    tok_s counts the tokens that arrived within those `seconds` (when `clients` streams are running):
    requests still in flight at the deadline finish with fewer and fewer streams, a tail that says
    nothing about N-stream throughput (tok_s_all includes it)."""
    results: list[dict] = []
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(i: int) -> None:
        rng = random.Random(i)
        async with httpx.AsyncClient(timeout=120) as client:
            while time.perf_counter() < deadline:
                body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "stream": True,
                        "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
                        "temperature": 0.8, "seed": rng.randrange(1 << 30), "ignore_eos": True}
                try:
                    results.append(await stream_one(client, url, body))
                except httpx.HTTPError as e:
                    results.append({"status": 0, "ok": False, "error": repr(e)})

    async def at_deadline() -> dict:  # /metrics when the window closes (its batch sizes: N streams only)
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        return await asyncio.to_thread(scrape, url)

    t0 = time.perf_counter()
    snap, *_ = await asyncio.gather(at_deadline(), *(worker(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    # tokens per request are exact (usage); content chunks are ~1 token each: scale by the chunk share
    window = sum(r["tokens"] * sum(start <= t <= deadline for t in r["times"]) / len(r["times"]) for r in ok if r["times"])
    gaps = [g for r in ok for g in r["gaps"]]
    ttft = [r["ttft"] for r in ok]
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok), "tokens": tokens,
            "wall_s": wall, "tok_s": window / seconds, "tok_s_all": tokens / wall, "metrics_at_deadline": snap,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(gaps, 50), "itl_p99_ms": 1e3 * pct(gaps, 99),
            "itl_mean_per_token_ms": 1e3 * statistics.mean([r["itl"] for r in ok if r["itl"]]) if ok else float("nan")}


MALFORMED = [
    (b'{"messages": [', "application/json"),  # truncated JSON
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": 7}).encode(), "application/json"),
    (json.dumps({"messages": []}).encode(), "application/json"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "application/json"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}).encode(), "application/json"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}).encode(), "application/json"),
    (json.dumps({"messages": "hello"}).encode(), "application/json"),
    (b"\xff\xfe garbage", "text/plain"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 0}).encode(), "application/json"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}).encode(), "application/json"),
]


async def soak(url: str, seconds: float, clients: int, malformed: float, hang_up: float, max_tokens: int) -> dict:
    counts = {"well_formed": 0, "answered": 0, "hung_up": 0, "malformed": 0, "malformed_4xx": 0, "server_5xx": 0,
              "other_failures": 0}
    failures: list[str] = []
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        rng = random.Random(1000 + i)
        async with httpx.AsyncClient(timeout=120) as client:
            while time.perf_counter() < deadline:
                try:
                    if rng.random() < malformed:
                        counts["malformed"] += 1
                        content, ctype = rng.choice(MALFORMED)
                        r = await client.post(url + "/v1/chat/completions", content=content,
                                              headers={"content-type": ctype})
                        body = r.json()
                        if 400 <= r.status_code < 500 and set(body["error"]) == {"message", "type", "param", "code"}:
                            counts["malformed_4xx"] += 1
                        elif r.status_code >= 500:
                            counts["server_5xx"] += 1
                            failures.append(f"malformed -> {r.status_code} {r.text[:200]}")
                        else:
                            counts["other_failures"] += 1
                            failures.append(f"malformed -> {r.status_code} {r.text[:200]}")
                        continue
                    body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                            "max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0, 0.7, 1.0]),
                            "seed": rng.randrange(1 << 30), "stop": rng.choice([None, ["the"], ["\n", "?"]])}
                    if rng.random() < 0.5:  # non-streaming
                        counts["well_formed"] += 1
                        r = await client.post(url + "/v1/chat/completions", json=body)
                        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                    else:
                        hang = rng.random() < hang_up
                        res = await stream_one(client, url, {**body, "stream": True}, hang_up_after=1 if hang else None)
                        if res.get("hung_up"):
                            counts["hung_up"] += 1
                            continue
                        counts["well_formed"] += 1
                        r, ok = None, res["ok"]
                        if not ok and res["status"] >= 500:
                            counts["server_5xx"] += 1
                    if ok:
                        counts["answered"] += 1
                    else:
                        if r is not None and r.status_code >= 500:
                            counts["server_5xx"] += 1
                        counts["other_failures"] += 1
                        failures.append(f"well-formed -> {r.status_code if r is not None else 'stream'} "
                                        f"{(r.text if r is not None else res)!s:.200}")
                except httpx.HTTPError as e:
                    counts["other_failures"] += 1
                    failures.append(repr(e))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    counts["wall_s"] = time.perf_counter() - t0
    counts["failures"] = failures[:20]
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    ap.add_argument("--seconds", type=float, default=15.0, help="duration of each level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="server engine threads (the machine is shared)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--soak", type=float, default=0.0, help="soak for this many seconds instead of the levels")
    ap.add_argument("--clients", type=int, default=16, help="soak: concurrent clients")
    ap.add_argument("--malformed", type=float, default=0.1, help="soak: fraction of malformed requests")
    ap.add_argument("--hang-up", type=float, default=0.05, help="soak: fraction of streams the client abandons")
    ap.add_argument("--no-roofline", action="store_true")
    ap.add_argument("--kv-dtype", default="f32", choices=("f32", "f16"), help="the server's KV cache (bitllm serve --kv-dtype)")
    args = ap.parse_args()

    from bitllm import _engine
    from bitllm.serve.server import free_port

    roof = None if args.no_roofline else roofline_gbs(args.threads)
    print(machine_line(_engine.active_isa(), args.threads, roof))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", args.hidden, args.layers, args.ffn)
        print(f"model: random ternary llama, hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, vocab 320, I2; "
              f"server: --threads {args.threads} --max-batch {args.max_batch} --kv-dtype {args.kv_dtype}")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(model, port, args.threads, args.max_batch, args.kv_dtype)
        try:
            asyncio.run(run_level(url, 2, 2.0, 8))  # warm-up
            if args.soak:
                before = scrape(url)
                res = asyncio.run(soak(url, args.soak, args.clients, args.malformed, args.hang_up, args.max_tokens))
                time.sleep(0.5)
                after = scrape(url)
                codes = {k: v - before.get(k, 0) for k, v in after.items() if k.startswith("bitllm_requests_total")}
                res["server_5xx_metrics"] = sum(v for k, v in codes.items() if re.search(r'code="5\d\d"', k))
                res["kv_sequences_after"] = after["bitllm_kv_sequences"]
                res["active_after"] = after["bitllm_active_requests"]
                res["cancelled"] = after["bitllm_cancelled_total"] - before.get("bitllm_cancelled_total", 0)
                res["batch"] = batch_sizes(before, after)
                res["requests_by_code"] = codes
                rows = [[k, res[k]] for k in ("well_formed", "answered", "hung_up", "cancelled", "malformed",
                                             "malformed_4xx", "server_5xx", "server_5xx_metrics", "other_failures",
                                             "kv_sequences_after", "active_after")]
                rows.append(["mean batch size", f"{res['batch']['mean']:.2f}"])
                print(fmt_table(["soak " + f"{args.soak:.0f} s, {args.clients} clients", "value"], rows))
                passed = (res["server_5xx"] == 0 and res["server_5xx_metrics"] == 0 and res["other_failures"] == 0
                          and res["answered"] == res["well_formed"] and res["kv_sequences_after"] == 0)
                print("batch sizes:", res["batch"]["hist"])
                print("SOAK PASSED" if passed else f"SOAK FAILED: {res['failures']}")
                path = write_results("serve_soak", {"args": vars(args), "load_avg": loadavg(), "passed": passed, **res})
            else:
                rows, levels = [], []
                sizes = [int(x) for x in args.levels.split(",")]
                engine = engine_baseline(model, args.threads, sizes, args.max_tokens, kv_dtype=args.kv_dtype)
                for n in sizes:
                    before, s0, c0 = scrape(url), cpu_seconds(proc.pid), cpu_seconds()
                    res = asyncio.run(run_level(url, n, args.seconds, args.max_tokens))
                    res["server_cpu_s"], res["client_cpu_s"] = cpu_seconds(proc.pid) - s0, cpu_seconds() - c0
                    res["batch"] = batch_sizes(before, res.pop("metrics_at_deadline"))  # the window's steps
                    res["batch_all"] = batch_sizes(before, scrape(url))
                    levels.append(res)
                base, ebase = levels[0]["tok_s"], engine[sizes[0]]
                for r in levels:
                    e = engine[r["clients"]]
                    r["engine_tok_s"] = e
                    rows.append([r["clients"], r["requests"], r["errors"], f"{r['tok_s']:.0f}", f"{r['tok_s'] / base:.2f}x",
                                 f"{r['tok_s_all']:.0f}",
                                 f"{e:.0f}", f"{e / ebase:.2f}x", f"{r['tok_s'] / e:.0%}",
                                 f"{r['ttft_p50_ms']:.1f}", f"{r['ttft_p99_ms']:.1f}", f"{r['itl_p50_ms']:.2f}",
                                 f"{r['itl_p99_ms']:.2f}", f"{r['batch']['mean']:.1f}",
                                 f"{1e3 * r['server_cpu_s'] / max(1, r['tokens']):.2f}",
                                 f"{1e3 * r['client_cpu_s'] / max(1, r['tokens']):.2f}"])
                print(fmt_table(["clients", "requests", "errors", "server tok/s", "vs 1", "incl. tail", "engine tok/s", "vs 1",
                                 "server/engine", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                                 "mean batch", "server CPU ms/tok", "client CPU ms/tok"], rows))
                print("engine tok/s: the same model's Batch at batch size = clients, no HTTP (median of 5); "
                      "server tok/s: tokens of all streams that arrived within the level's seconds, per second "
                      "(incl. tail: every token of every request, over the time until the last in-flight request "
                      "finished with fewer streams); mean batch: the window's steps")
                for r in levels:
                    print(f"batch sizes at {r['clients']} clients (steps per histogram bucket): window {r['batch']['hist']}, "
                          f"incl. tail {r['batch_all']['hist']}")
                path = write_results(f"serve_load_h{args.hidden}_l{args.layers}", {"args": vars(args), "load_avg": loadavg(), "levels": levels})
            print(f"load avg after: {loadavg()}\nwrote {path}")
        finally:
            err = stop_server(proc)
            if "Traceback" in err:
                print("server stderr had a traceback:\n" + err[-3000:])


if __name__ == "__main__":
    main()
