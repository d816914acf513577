"""`vllm serve` on a tiny SINQ model under a bounded, mixed load.

One server (float32, eager, max-model-len 256, 127.0.0.1) takes 200 requests, at most 16
in flight, built from a seeded plan: completions and chat completions with mixed prompt
and output lengths and temperatures, streamed requests read to the end, streamed requests
cancelled after two chunks, and invalid requests (negative max_tokens, temperature < 0,
top_p > 1, an unknown model name, a prompt longer than max-model-len, a malformed body).
We check that

* every valid request is answered (200, well-formed body, token counts within bounds);
* greedy (temperature 0) outputs of a fixed prompt subset, sent several times, streamed
  and not, equal offline ``LLM.generate`` on the same checkpoint (computed first, in a
  separate engine that is shut down before the server starts);
* every invalid request gets a 4xx with an error message, and the server stays healthy;
* once the load is over no request is left running or waiting (cancelled streams were
  aborted, ``/metrics``), ``/health`` answers 200;
* the resident memory of the server process tree (psutil) grows by less than
  ``RSS_GROWTH_BOUND`` between a measurement after the warm-up requests and the last one.

The load stops by itself: a fixed request count, a per-request timeout and an overall
timeout (``LOAD_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections import Counter

import pytest

from conftest import vllm_engine
from vllm_server import serve

pytestmark = pytest.mark.slow

SEED = 8
N_REQUESTS = 200
WARMUP_REQUESTS = 40
CONCURRENCY = 16
MAX_MODEL_LEN = 256
REQUEST_TIMEOUT_S = 60
LOAD_TIMEOUT_S = 150
RSS_GROWTH_BOUND = 64 * 2**20  # bytes, between the early and the final measurement (measured: +6 MiB)
MODEL_NAME = "tiny-sinq"

GREEDY_PROMPTS = [
    "Once upon a time",
    "The little dog ran to the",
    "Tom and his mom went to the park. They saw",
    "She was very happy because",
    "One day, a big bird",
    "The sun was hot and the children wanted to",
    "Lily found a red ball under the tree and",
    "He said, \"I want to",
]
GREEDY_MAX_TOKENS = 12
WORDS = ("the cat dog sun tree ball happy little big girl boy mom dad park day ran saw said play "
         "friend red blue house went wanted very they she he was with and to a of in").split()


# --------------------------------------------------------------------------------------------
# offline reference (its own engine, before the server)


@pytest.fixture(scope="module")
def checkpoint(sinq_factory):
    return sinq_factory("llama", nbits=4, group_size=64)


@pytest.fixture(scope="module")
def offline_greedy(checkpoint):
    from vllm import SamplingParams

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process: quicker to start, gone before the server
        with vllm_engine(checkpoint, max_model_len=MAX_MODEL_LEN) as llm:
            outs = llm.generate(GREEDY_PROMPTS, SamplingParams(temperature=0, max_tokens=GREEDY_MAX_TOKENS))
    return {p: o.outputs[0].text for p, o in zip(GREEDY_PROMPTS, outs)}


# --------------------------------------------------------------------------------------------
# the server


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


# --------------------------------------------------------------------------------------------
# the load plan


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def build_plan(seed: int) -> list[dict]:
    """Seeded request specs: {"kind", "path", "body" (or "raw"), "expect"}."""
    rng = random.Random(seed)
    plan: list[dict] = []
    for i, p in enumerate(GREEDY_PROMPTS * 2):
        plan.append({"kind": "greedy-stream" if i % 4 == 3 else "greedy", "prompt": p, "stream": i % 4 == 3,
                     "path": "/v1/completions", "expect": 200,
                     "body": {"prompt": p, "max_tokens": GREEDY_MAX_TOKENS, "temperature": 0}})
    too_long = _prompt(rng, 400)
    invalid = [
        ("negative max_tokens", {"prompt": "hello", "max_tokens": -3}),
        ("temperature < 0", {"prompt": "hello", "max_tokens": 4, "temperature": -0.5}),
        ("top_p > 1", {"prompt": "hello", "max_tokens": 4, "top_p": 2.0}),
        ("unknown model", {"prompt": "hello", "max_tokens": 4, "model": "no-such-model"}),
        ("prompt > max-model-len", {"prompt": too_long, "max_tokens": 4}),
        ("malformed body", None),
    ]
    for r in range(4):
        for label, body in invalid:
            spec = {"kind": "invalid: " + label, "path": "/v1/completions", "expect": "4xx", "body": body}
            if body is None:
                spec["raw"] = b'{"prompt": "hello", "max_tokens": '
            plan.append(spec)
    for _ in range(20):
        plan.append({"kind": "stream-cancel", "path": "/v1/completions", "expect": 200, "stream": True,
                     "cancel_after": 2,
                     "body": {"prompt": _prompt(rng, rng.randint(2, 60)), "max_tokens": 64, "temperature": 0.8,
                              "ignore_eos": True}})
    for _ in range(20):
        plan.append({"kind": "stream", "path": "/v1/completions", "expect": 200, "stream": True,
                     "body": {"prompt": _prompt(rng, rng.randint(1, 120)), "max_tokens": rng.randint(1, 16),
                              "temperature": rng.choice([0, 0.7, 1.0])}})
    for _ in range(20):
        plan.append({"kind": "chat", "path": "/v1/chat/completions", "expect": 200,
                     "body": {"messages": [{"role": "user", "content": _prompt(rng, rng.randint(1, 40))}],
                              "max_tokens": rng.randint(1, 16), "temperature": rng.choice([0, 0.7])}})
    while len(plan) < N_REQUESTS:
        body = {"prompt": _prompt(rng, rng.randint(1, 150)), "max_tokens": rng.randint(1, 16),
                "temperature": rng.choice([0, 0.7, 1.0])}
        if rng.random() < 0.2:
            body["logprobs"] = 2
        plan.append({"kind": "completion", "path": "/v1/completions", "expect": 200, "body": body})
    rng.shuffle(plan)
    for spec in plan:
        if spec.get("body") is not None:
            spec["body"].setdefault("model", MODEL_NAME)
            if spec.get("stream"):
                spec["body"]["stream"] = True
    return plan


async def send(client, base: str, spec: dict) -> dict:
    """Send one request; returns {"status", "text", "error", "chunks", "usage"}."""
    url = base + spec["path"]
    if "raw" in spec:
        r = await client.post(url, content=spec["raw"], headers={"Content-Type": "application/json"})
        return {"status": r.status_code, "body": _json(r.text)}
    if not spec.get("stream"):
        r = await client.post(url, json=spec["body"])
        return {"status": r.status_code, "body": _json(r.text)}
    out = {"status": None, "chunks": 0, "text": "", "done": False, "body": None}
    async with client.stream("POST", url, json=spec["body"]) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["body"] = _json((await r.aread()).decode())
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                out["done"] = True
                break
            chunk = json.loads(data)
            out["chunks"] += 1
            out["text"] += "".join(c.get("text") or "" for c in chunk.get("choices", []))
            if spec.get("cancel_after") and out["chunks"] >= spec["cancel_after"]:
                break  # leaving the context closes the connection mid-stream: the server must abort it
    return out


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return {"unparsed": text[:500]}


async def run_load(base: str, pid: int, plan: list[dict]) -> dict:
    import httpx

    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    results: list[dict | None] = [None] * len(plan)

    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        async def one(i: int) -> None:
            async with sem:
                t0 = time.perf_counter()
                try:
                    res = await send(client, base, plan[i])
                except Exception as e:  # a timeout or a dropped connection: counted, reported
                    res = {"status": None, "exception": f"{type(e).__name__}: {e}"}
                res["seconds"] = time.perf_counter() - t0
                results[i] = res

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(WARMUP_REQUESTS)))
        rss_early = tree_rss(pid)
        await asyncio.gather(*(one(i) for i in range(WARMUP_REQUESTS, len(plan))))
        load_seconds = time.perf_counter() - t0
        idle = await _wait_idle(client, base)
        health = (await client.get(base + "/health")).status_code
        rss_final = tree_rss(pid)
    return {"results": results, "rss_early": rss_early, "rss_final": rss_final, "health": health, "idle": idle,
            "load_seconds": load_seconds}


async def _wait_idle(client, base: str, timeout: float = 20) -> dict:
    """Requests running/waiting per /metrics, polled until both are 0 (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        text = (await client.get(base + "/metrics")).text
        state = {}
        for gauge in ("num_requests_running", "num_requests_waiting"):
            values = re.findall(rf"^vllm:{gauge}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
            state[gauge] = sum(float(v) for v in values) if values else None
        if all(v == 0 for v in state.values()) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.5)


# --------------------------------------------------------------------------------------------


def test_server_under_mixed_load(checkpoint, offline_greedy, tmp_path):
    plan = build_plan(SEED)
    assert len(plan) == N_REQUESTS
    with serve(checkpoint, tmp_path / "server.log", served_name=MODEL_NAME, max_model_len=MAX_MODEL_LEN) as (
        base, proc, log
    ):
        rss_start = tree_rss(proc.pid)
        stats = asyncio.run(asyncio.wait_for(run_load(base, proc.pid, plan), LOAD_TIMEOUT_S))
        alive = proc.poll() is None
    results = stats["results"]

    by_class = Counter("exception" if r["status"] is None else f"{r['status'] // 100}xx" for r in results)
    by_kind = Counter(s["kind"].split(":")[0] for s in plan)
    greedy_mismatch, problems = [], []
    for spec, res in zip(plan, results):
        where = f"{spec['kind']} {json.dumps(spec.get('body'))[:120]}: {json.dumps(res)[:400]}"
        if spec["expect"] == "4xx":
            body = res.get("body")
            msg = body.get("error", {}).get("message") if isinstance(body, dict) else None
            if not (res["status"] is not None and 400 <= res["status"] < 500 and msg):
                problems.append("invalid request not refused with a 4xx error message: " + where)
            continue
        if res["status"] != 200:
            problems.append("valid request not answered: " + where)
            continue
        body = spec["body"]
        if spec.get("stream"):
            if not spec.get("cancel_after") and not res["done"]:
                problems.append("stream did not end with [DONE]: " + where)
            if res["chunks"] < 1:
                problems.append("stream without chunks: " + where)
            text = res["text"]
        else:
            choice = res["body"]["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            used = res["body"]["usage"]["completion_tokens"]
            if not (1 <= used <= body["max_tokens"]) or choice["finish_reason"] not in ("stop", "length"):
                problems.append("bad usage/finish_reason: " + where)
        if spec["kind"].startswith("greedy") and text != offline_greedy[spec["prompt"]]:
            greedy_mismatch.append((spec["prompt"], text, offline_greedy[spec["prompt"]]))

    growth = stats["rss_final"] - stats["rss_early"]
    ok = sum(1 for s, r in zip(plan, results) if s["expect"] == 200 and r["status"] == 200)
    print(f"\nserver load: {len(plan)} requests ({dict(by_kind)}) in {stats['load_seconds']:.1f}s, "
          f"{CONCURRENCY} concurrent; responses by status class {dict(by_class)}; valid answered "
          f"{ok}/{sum(1 for s in plan if s['expect'] == 200)}; greedy mismatches {len(greedy_mismatch)}/"
          f"{sum(1 for s in plan if s['kind'].startswith('greedy'))}; after load {stats['idle']}, health "
          f"{stats['health']}; server tree RSS start {rss_start / 2**20:.0f} MiB, after warm-up "
          f"{stats['rss_early'] / 2**20:.0f} MiB, final {stats['rss_final'] / 2**20:.0f} MiB "
          f"(growth {growth / 2**20:+.1f} MiB, bound {RSS_GROWTH_BOUND / 2**20:.0f} MiB)")
    for p in problems[:10]:
        print("  PROBLEM", p)
    assert alive, "the server died under load"
    assert not problems, f"{len(problems)} problems, first: {problems[0]}"
    assert not greedy_mismatch, greedy_mismatch[:3]
    assert stats["health"] == 200
    assert stats["idle"] == {"num_requests_running": 0, "num_requests_waiting": 0}, stats["idle"]
    assert growth < RSS_GROWTH_BOUND, f"server RSS grew by {growth / 2**20:.1f} MiB under load"
