"""The OpenAI-compatible server (impl/server/), as a real process on loopback, through the
official `openai` client, httpx and raw sockets.

The oracle for what it answers is the engine run offline in this process (impl.engine.LLM) on
prompts that transformers' tokenizer built (its apply_chat_template on the same GGUF): so the
server's greedy text, its usage counts and its chat template are each checked against
something that did not go through the server or impl's template.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_process import ROOT, ServerProcess, checked_server

openai = pytest.importorskip("openai", reason="the test group installs openai; run with nox -s tests")
# (importorskip only where the module is missing: the test environment always has it)

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
             "What is 2 + 2?", "Say hello in Spanish."]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server():
    """One server for the module; its exit on SIGTERM is checked at the end."""
    yield from checked_server("--max-num-seqs", "64")


@pytest.fixture(scope="module")
def offline():
    """The engine offline, in this process: the oracle."""
    from impl.engine import LLM

    return LLM(log=False)


@pytest.fixture(scope="module")
def hf():
    """transformers' tokenizer for the same GGUF, with the GGUF's chat template."""
    from impl.loader import default_model_path
    from reference.tokenizer import hf_tokenizer

    return hf_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def chat_ids(hf, messages: list[dict]) -> list[int]:
    return list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def expected(offline, prompts: list[list[int]], **params):
    """The offline engine's outputs for token-id prompts (greedy unless params say otherwise)."""
    from impl.engine import SamplingParams

    params = {"max_tokens": MAX_TOKENS, **params}
    return offline.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**params))


def metrics(server) -> dict[str, float]:
    """/metrics' unlabelled values by name (the model_name label dropped)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        m = re.match(r'^(tiny_llm:[a-z_]+)\{model_name="[^"]*"\} (\S+)$', line)
        if m:
            values[m[1]] = float(m[2])
    return values


def wait_idle(server, timeout: float = 10.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no KV block is held; returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = m["tiny_llm:num_requests_running"] == 0 and m["tiny_llm:num_requests_waiting"] == 0
        if (idle and m["tiny_llm:kv_blocks_used"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


# ---------------------------------------------------------------- what a client gets


def test_health_models_and_the_chat_page(server, model_name):
    """GET /health is 200, /v1/models lists the served model with its context, / is the chat page."""
    assert httpx.get(f"{server.url}/health").status_code == 200
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [model_name]
    assert models["data"][0]["max_model_len"] == 8192
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_greedy_chat_equals_the_engine_offline_on_the_models_template(client, model_name, offline, hf):
    """Chat completions, greedy, not streamed: for each question the text, finish reason and
    usage equal the offline engine's on transformers' templated prompt."""
    prompts = [chat_ids(hf, [{"role": "user", "content": q}]) for q in QUESTIONS]
    want = expected(offline, prompts)
    for q, p, w in zip(QUESTIONS, prompts, want, strict=True):
        r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": q}],
                                           temperature=0, max_tokens=MAX_TOKENS)
        c = r.choices[0]
        assert c.message.content == w.text and c.message.role == "assistant", q
        assert c.finish_reason == w.finish_reason
        assert r.usage.prompt_tokens == len(p), "the prompt is the model's own template, counted by its tokenizer"
        assert r.usage.completion_tokens == len(w.token_ids)
        assert r.usage.total_tokens == len(p) + len(w.token_ids)
        assert r.object == "chat.completion" and r.model == model_name


def test_streamed_chat_gives_the_same_text_and_the_usage_last(client, model_name, offline, hf):
    """Streamed chat: the deltas join to the offline text; one finish reason; the usage chunk
    (stream_options.include_usage) comes last with no choices."""
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"}]
    prompt = chat_ids(hf, messages)
    (w,) = expected(offline, [prompt])
    chunks = list(client.chat.completions.create(model=model_name, messages=messages, temperature=0,
                                                 max_completion_tokens=MAX_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == w.text and reasons == [w.finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(prompt)
    assert chunks[-1].usage.completion_tokens == len(w.token_ids)
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_completions_text_and_token_ids_n_and_logprobs(client, model_name, offline):
    """Text completions: a text prompt and a token-id prompt, n=2 (greedy: two equal choices),
    logprobs whose tokens spell the text; usage counts the prompt once per prompt."""
    text_prompt = "The three primary colours are"
    ids = offline.tokenizer.encode(text_prompt)
    (w,) = expected(offline, [ids], max_tokens=12)
    for prompt in (text_prompt, ids):
        r = client.completions.create(model=model_name, prompt=prompt, temperature=0, max_tokens=12, n=2,
                                      logprobs=3)
        assert [c.index for c in r.choices] == [0, 1]
        for c in r.choices:
            assert c.text == w.text and c.finish_reason == w.finish_reason
            assert "".join(c.logprobs.tokens) == w.text, "each output token's text, in order"
            assert all(len(t) <= 3 for t in c.logprobs.top_logprobs)
            assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 2 * len(w.token_ids)


def test_chat_logprobs_are_the_engines(client, model_name, offline, hf):
    """Chat logprobs: per token the chosen token's log-probability equals the offline engine's,
    and top_logprobs lists the k most likely, best first."""
    messages = [{"role": "user", "content": QUESTIONS[3]}]
    (w,) = expected(offline, [chat_ids(hf, messages)], max_tokens=8, logprobs=2)
    r = client.chat.completions.create(model=model_name, messages=messages, temperature=0, max_tokens=8,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == len(w.token_ids)
    for entry, token, table in zip(content, w.token_ids, w.logprobs, strict=True):
        assert entry.logprob == table[token], "the same computation: the same bits"
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 2 and top == sorted(top, reverse=True) and top[0] == max(table.values())


def test_a_stop_string_ends_the_text_before_it(client, model_name, offline, hf):
    """stop: the text ends just before the first occurrence of the stop string, reason "stop"."""
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    (w,) = expected(offline, [chat_ids(hf, messages)])
    words = w.text.split()
    assert len(words) >= 4, f"the greedy answer is too short to cut: {w.text!r}"
    stop = words[len(words) // 2]
    r = client.chat.completions.create(model=model_name, messages=messages, temperature=0,
                                       max_tokens=MAX_TOKENS, stop=[stop])
    assert r.choices[0].message.content == w.text[:w.text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_the_engine_offline(client, model_name, offline, hf):
    """A seeded sampled request (temperature, top_p, top_k, min_p) gives the offline engine's
    tokens for the same seed, twice; another seed gives another text."""
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    (w,) = expected(offline, [chat_ids(hf, messages)], seed=1234, temperature=0.9, top_p=0.95, top_k=40, min_p=0.01)
    texts = [client.chat.completions.create(model=model_name, messages=messages, max_tokens=MAX_TOKENS, seed=s,
                                            temperature=0.9, top_p=0.95, extra_body={"top_k": 40, "min_p": 0.01}
                                            ).choices[0].message.content
             for s in (1234, 1234, 99)]
    assert texts[0] == texts[1] == w.text
    assert texts[2] != w.text


def test_100_concurrent_streaming_clients_each_get_their_text_and_every_block_returns(server, model_name,
                                                                                      offline, hf):
    """100 streaming clients at once, each its own question: each gets the offline engine's text
    for it; afterwards no request runs and every KV block is free again (read from /metrics)."""
    questions = [f"What is {i} plus {i + 1}? Answer with the number." for i in range(100)]
    prompts = [chat_ids(hf, [{"role": "user", "content": q}]) for q in questions]
    want = expected(offline, prompts, max_tokens=12)

    async def one(aclient, q: str) -> str:
        stream = await aclient.chat.completions.create(model=model_name, messages=[{"role": "user", "content": q}],
                                                       temperature=0, max_tokens=12, stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def all_of_them():
        limits = httpx.Limits(max_connections=128)
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300,
                                      http_client=httpx.AsyncClient(limits=limits, timeout=300)) as aclient:
            return await asyncio.gather(*(one(aclient, q) for q in questions))

    texts = asyncio.run(all_of_them())
    wrong = [(q, t, w.text) for q, t, w in zip(questions, texts, want, strict=True) if t != w.text]
    assert not wrong, f"{len(wrong)} of 100 got another text, e.g. {wrong[0]}"
    m = wait_idle(server)
    assert m["tiny_llm:num_requests_running"] == 0 and m["tiny_llm:kv_blocks_used"] == 0, m
    assert m["tiny_llm:kv_blocks_free"] == m["tiny_llm:kv_blocks_total"]


def test_a_client_that_disconnects_mid_stream_is_aborted_and_others_go_on(server, model_name, offline, hf):
    """A client leaves mid-stream (a long request): its request ends and its blocks are freed
    within a second or two, while another client's stream finishes with its right text."""
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    (w,) = expected(offline, [chat_ids(hf, messages)], max_tokens=48)
    long = {"model": model_name, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 4000, "ignore_eos": True, "temperature": 0.8, "stream": True}
    other = {"model": model_name, "messages": messages, "max_tokens": 48, "temperature": 0, "stream": True}

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            async def leave_early():
                async with c.stream("POST", "/v1/chat/completions", json=long) as r:
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += line.startswith("data: ")
                        if seen >= 5:
                            break  # closing the response closes the connection: the client is gone
                return time.monotonic()

            async def stay():
                text = ""
                async with c.stream("POST", "/v1/chat/completions", json=other) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            delta = json.loads(line[6:])["choices"]
                            text += delta[0]["delta"].get("content", "") if delta else ""
                return text

            return await asyncio.gather(leave_early(), stay())

    left_at, text = asyncio.run(scenario())
    assert text == w.text, "the other client's stream was not disturbed"
    m = wait_idle(server, timeout=5)
    assert m["tiny_llm:kv_blocks_used"] == 0 and m["tiny_llm:num_requests_running"] == 0, m
    assert time.monotonic() - left_at < 5


def test_a_client_that_disconnects_before_a_non_streamed_answer_is_aborted(server, model_name):
    """A non-streamed request whose client goes away (a raw socket closed after sending) is
    aborted too: nothing runs and no block is held a few seconds later."""
    body = json.dumps({"model": model_name, "prompt": "Once upon a time", "max_tokens": 4000,
                       "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head + body)
        deadline = time.monotonic() + 30
        while metrics(server)["tiny_llm:num_requests_running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics(server)["tiny_llm:num_requests_running"] == 1, "the request never started"
    m = wait_idle(server, timeout=5)
    assert m["tiny_llm:num_requests_running"] == 0 and m["tiny_llm:kv_blocks_used"] == 0, m


# ---------------------------------------------------------------- bad input

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]
BAD = [  # (what, path, body (bytes, or a dict sent as JSON), status, param)
    ("malformed JSON", CHAT, b'{"messages": [', 400, None),
    ("not an object", CHAT, b"[1, 2]", 400, None),
    ("messages of the wrong type", CHAT, {"messages": "hi"}, 400, "messages"),
    ("no messages", CHAT, {"messages": []}, 400, "messages"),
    ("an unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("max_tokens as a string", CHAT, {"messages": HELLO, "max_tokens": "10"}, 400, "max_tokens"),
    ("temperature as a string", CHAT, {"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ("stream as a number", CHAT, {"messages": HELLO, "stream": 1}, 400, "stream"),
    ("an unknown model", CHAT, {"model": "gpt-9", "messages": HELLO}, 404, "model"),
    ("a negative temperature", CHAT, {"messages": HELLO, "temperature": -1}, 400, "temperature"),
    ("top_p of 0", CHAT, {"messages": HELLO, "top_p": 0}, 400, "top_p"),
    ("top_k below -1", CHAT, {"messages": HELLO, "top_k": -5}, 400, "top_k"),
    ("min_p above 1", CHAT, {"messages": HELLO, "min_p": 2}, 400, "min_p"),
    ("top_logprobs above 20", CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("n of 0", CHAT, {"messages": HELLO, "n": 0}, 400, "n"),
    ("n of 1000", CHAT, {"messages": HELLO, "n": 1000}, 400, "n"),
    ("max_tokens of 0", CHAT, {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens past the context", CHAT, {"messages": HELLO, "max_tokens": 10**9}, 400, "max_tokens"),
    ("a frequency penalty", CHAT, {"messages": HELLO, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("an empty stop string", CHAT, {"messages": HELLO, "stop": [""]}, 400, "stop"),
    ("stream_options without stream", CHAT, {"messages": HELLO, "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("a prompt longer than the context", "/v1/completions", {"prompt": [1] * 9000, "max_tokens": 4}, 400, "prompt"),
    ("a token id outside the vocabulary", "/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("an empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("a prompt of the wrong type", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("echo", "/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("a body over the size limit", CHAT, {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, None),
]


@pytest.mark.parametrize("what,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_with_an_openai_error_body(server, what, path, body, status, param):
    """Each bad request: its HTTP status, an OpenAI-style error body naming the field; and the
    server goes on serving."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "\n" not in error["message"], "one line"
    assert error["param"] == param, error


def test_unknown_routes_and_methods_get_error_bodies_and_the_server_goes_on(server, client, model_name):
    """404 and 405 come as OpenAI-style bodies too; after every bad request so far, a good one
    is still answered."""
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", CHAT, 405)):
        r = httpx.request(method, f"{server.url}{path}")
        assert r.status_code == status and r.json()["error"]["message"]
    r = client.chat.completions.create(model=model_name, messages=HELLO, temperature=0, max_tokens=4)
    assert r.choices[0].message.content
    assert wait_idle(server)["tiny_llm:kv_blocks_used"] == 0


def test_an_api_key_when_set_is_required_on_v1(client):
    """--api-key: /v1/ without the key or with a wrong one is 401 with an error body; with it, 200;
    /health needs none."""
    with ServerProcess("--api-key", "s3cret", "--kv-cache-memory", "64M") as keyed:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(f"{keyed.url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        ok = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert ok.completions.create(model=ok.models.list().data[0].id, prompt="Hi", max_tokens=2).choices
        assert httpx.get(f"{keyed.url}/health").status_code == 200


_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-10**20, 10**20),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                    st.lists(st.integers(-5, 60000), max_size=5), st.lists(st.text(max_size=5), max_size=3))
_fields = st.sampled_from(["model", "messages", "prompt", "temperature", "top_p", "top_k", "min_p", "seed",
                           "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs", "echo",
                           "frequency_penalty", "ignore_eos", "stop_token_ids", "max_completion_tokens", "x"])
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot", 3]),
                                            "content": st.one_of(st.text(max_size=30), st.integers())}),
                     max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from([CHAT, "/v1/completions"]), fields=st.dictionaries(_fields, _values, max_size=6),
       messages=_messages, max_tokens=st.one_of(st.integers(-2, 4), st.text(max_size=3)))
def test_drawn_bodies_never_get_a_5xx_or_hang(server, path, fields, messages, max_tokens):
    """Hypothesis-drawn bodies (right and wrong fields, values of every type): the answer is a 200
    or a 4xx with an error body, within a bounded time, never a 5xx. max_tokens is always drawn
    small (or wrong), so that a valid body ends quickly."""
    body = {"messages": messages, "prompt": "Hi", **fields, "max_tokens": max_tokens}
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]["message"], body
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]


# ---------------------------------------------------------------- stopping


def test_sigterm_finishes_running_streams_then_exits_0_without_a_traceback():
    """SIGTERM while a stream runs: the server stops accepting, lets the stream finish (within
    --graceful-timeout), and exits with code 0 and no traceback."""
    proc = ServerProcess("--kv-cache-memory", "64M", "--graceful-timeout", "30").start()
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        chunks, usage, done = 0, None, False
        with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if chunks == 2:
                        proc.proc.send_signal(signal.SIGTERM)
                    usage = json.loads(line[6:]).get("usage") or usage
                done = done or line == "data: [DONE]"
        assert done and usage["completion_tokens"] == 40, "the running stream was finished, not cut"
        with pytest.raises(httpx.HTTPError):  # no longer accepting
            httpx.get(f"{proc.url}/health", timeout=5)
        rc = proc.proc.wait(30)
    finally:
        rc_stop = proc.stop()
    out = proc.output()
    assert rc == 0 == rc_stop and "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize("flags", [["--port", "99999"], ["--max-num-seqs", "0"], ["--model", "/nope.gguf"],
                                   ["--kv-cache-memory", "1K"], ["--graceful-timeout", "-1"], ["--bogus"],
                                   ["--speculative-config", '{"method": "eagle"}'],
                                   ["--speculative-config", '{"num_speculative_tokens": 0}'],
                                   ["--speculative-config", '{"method": "draft_model", "model": "no-such-draft"}']],
                         ids=lambda f: " ".join(f))
def test_bad_flags_get_one_line_and_exit_code_2(flags):
    """A bad flag (or a model or budget that cannot be served) is one `error:` line, exit code 2,
    before anything listens."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "impl.server", *flags], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    lines = [line for line in r.stderr.splitlines() if not line.startswith("[KV cache")]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr


def test_n_choices_share_the_prompt_through_the_prefix_cache(server, client, model_name, offline):
    """n=4 on a long prompt: the first choice prefills it, the other three find its full blocks in
    the prefix cache (the hit rate rises); seeded choices i draw from seed + i, as the engine
    offline gives them."""
    prompt = [t % 5000 + 100 for t in range(300)]  # 18 full blocks of 16 and a partial one
    before = metrics(server)
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, n=4, temperature=0.8, seed=7)
    want = [expected(offline, [prompt], max_tokens=8, temperature=0.8, seed=7 + i)[0].text for i in range(4)]
    assert [c.text for c in r.choices] == want
    after = metrics(server)
    queried = after["tiny_llm:prefix_cache_queries_total"] - before["tiny_llm:prefix_cache_queries_total"]
    hits = after["tiny_llm:prefix_cache_hits_total"] - before["tiny_llm:prefix_cache_hits_total"]
    assert (queried, hits) == (4 * 300, 3 * 18 * 16), "choices 1-3 each found the prompt's 18 full blocks"
    assert r.usage.prompt_tokens == 300


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_matmuls_give_the_engines_answer(offline, hf, precision):
    """--matmul-precision bf16 / int8: the server's greedy answer and logprobs are the offline
    engine's with such matmuls, bit for bit, and its logprobs are not the fp32 ones (the flag took effect)."""
    import impl.quantize
    from impl.engine import LLM

    messages = [{"role": "user", "content": QUESTIONS[0]}]
    prompt = chat_ids(hf, messages)  # 37 tokens: the prefill's matmuls have >= 16 rows, so even bf16 runs
    # An engine of its own without a prefix cache: no block computed at one precision serves the other.
    own = LLM(offline.loaded, log=False, enable_prefix_caching=False)
    (fp32,) = expected(own, [prompt], max_tokens=8, logprobs=0)
    was, impl.quantize.MATMUL_PRECISION = impl.quantize.MATMUL_PRECISION, precision
    try:
        (low,) = expected(own, [prompt], max_tokens=8, logprobs=0)
    finally:
        impl.quantize.MATMUL_PRECISION = was
    with ServerProcess("--matmul-precision", precision, "--kv-cache-memory", "64M") as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model=c.models.list().data[0].id, messages=messages, temperature=0,
                                      max_tokens=8, logprobs=True)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == low.text
    assert [e.logprob for e in content] == [t[i] for i, t in zip(low.token_ids, low.logprobs, strict=True)]
    assert content[0].logprob != fp32.logprobs[0][fp32.token_ids[0]], "the first token's logprob is fp32's"


def test_speculative_config_gives_the_engines_greedy_answer_and_counts_drafts(offline, hf):
    """--speculative-config (vLLM's flag): n-gram drafts verified in the engine give the engine's plain
    greedy answer (the default model on the kernels: exactly), and /metrics counts drafts and acceptances."""
    messages = [{"role": "user", "content": "Repeat this sentence exactly: the cat sat on the mat, the cat sat on the mat."}]
    (w,) = expected(offline, [chat_ids(hf, messages)])
    config = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    with ServerProcess("--speculative-config", config, "--kv-cache-memory", "64M") as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model=c.models.list().data[0].id, messages=messages, temperature=0,
                                      max_tokens=MAX_TOKENS)
        m = metrics(s)
    assert r.choices[0].message.content == w.text
    drafted, accepted = m["tiny_llm:spec_decode_num_draft_tokens_total"], m["tiny_llm:spec_decode_num_accepted_tokens_total"]
    assert drafted > 0 and 0 <= accepted <= drafted, m
    assert m["tiny_llm:spec_decode_draft_cache_positions"] == 0, m  # n-gram drafts: no draft model, no cache
