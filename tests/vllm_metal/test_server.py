"""`vllm serve` on the Metal platform, driven with the `openai` client (short forms for CI;
tools/soak.py and tools/bench_serve.py run the long forms)."""
import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from serving import Server, ensure_tiny_model  # noqa: E402

NAME = "tiny"
API_KEY = "test-key"
MAX_MODEL_LEN = 512
PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a land far away, there lived",
    "def fibonacci(n):",
    "MLX is an array framework for",
    "A" * 40,
    "numbers: 1 2 3 4 5 6 7 8 9",
    "The capital of",
    "hello",
]


@pytest.fixture(scope="module")
def model():
    return ensure_tiny_model("LlamaForCausalLM")


@pytest.fixture(scope="module")
def server(model):
    srv = Server(model, name=NAME, api_key=API_KEY,
                 extra_args=("--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "32"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _offline_greedy(model, prompts, max_tokens):
    """vllm.LLM greedy output for the same prompts, in a fresh process like a user's script."""
    code = textwrap.dedent(f"""
        import json, sys
        from vllm import LLM, SamplingParams
        llm = LLM(model={model!r}, max_model_len={MAX_MODEL_LEN}, seed=0)
        outs = llm.generate({prompts!r}, SamplingParams(temperature=0.0, max_tokens={max_tokens}))
        print("RESULT " + json.dumps([o.outputs[0].text for o in outs]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _greedy(client, prompt, max_tokens=16, **kw):
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens,
                                  temperature=0.0, **kw)
    return r.choices[0].text


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completions_equal_offline_greedy(client, model):
    served = [_greedy(client, p) for p in PROMPTS]
    assert served == _offline_greedy(model, PROMPTS, 16)


def test_streaming_equals_non_streaming(client):
    for prompt in PROMPTS[:3]:
        stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=16,
                                           temperature=0.0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream) == _greedy(client, prompt)


def test_chat_completion_with_template(client):
    messages = [{"role": "user", "content": "Say something."}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                           temperature=0.0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                            temperature=0.0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == reply.choices[0].message.content


def test_n_greater_than_one(client):
    r = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=8, n=3,
                                  temperature=1.0, seed=1)
    assert len(r.choices) == 3 and sorted(c.index for c in r.choices) == [0, 1, 2]


def test_max_tokens_and_stop_strings(client):
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0.0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    full = _greedy(client, PROMPTS[0], max_tokens=24)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if stop.strip():
        r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=24,
                                      temperature=0.0, stop=[stop])
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].text == full[:full.index(stop)]


def test_logprobs(client):
    r = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=4, temperature=0.0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) >= 3 and chosen <= 0.0
        assert chosen == pytest.approx(max(top.values()), abs=1e-4)  # greedy picks the argmax
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, temperature=0.0, logprobs=True,
                                          top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 3


def test_concurrent_streams_equal_sequential(server, client):
    prompts = [PROMPTS[i % len(PROMPTS)] + f" #{i}" for i in range(32)]
    sequential = [_greedy(client, p, max_tokens=12) for p in prompts]

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model=NAME, prompt=prompt, max_tokens=12,
                                                  temperature=0.0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def all_at_once():
        aclient = server.async_client()
        return await asyncio.gather(*(one(aclient, p) for p in prompts))

    assert asyncio.run(all_at_once()) == sequential


def test_client_disconnect_leaves_engine_serving(server, client):
    with requests.post(server.url + "/v1/completions", stream=True, timeout=300,
                       headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": NAME, "prompt": PROMPTS[1], "max_tokens": 200,
                             "temperature": 0.0, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith(b"data:")
    # the connection is closed mid-stream; the engine must abort that request and go on
    assert _greedy(client, PROMPTS[0]) == _greedy(client, PROMPTS[0])


def test_memory_stays_flat(server, client):
    for _ in range(10):  # warm-up: caches, allocator pools
        _greedy(client, PROMPTS[3], max_tokens=8)
    start = server.rss_bytes()
    for i in range(60):
        _greedy(client, PROMPTS[i % len(PROMPTS)], max_tokens=8)
    growth = (server.rss_bytes() - start) / start
    assert growth < 0.05, f"server RSS grew {growth:.1%} over 60 requests"


def _post(server, path, body, key=API_KEY, raw=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return requests.post(server.url + path, data=raw if raw is not None else json.dumps(body),
                         headers=headers, timeout=120)


@pytest.mark.parametrize("case", ["too_long", "negative_max_tokens", "bad_top_p",
                                  "negative_temperature", "malformed_json", "unknown_model"])
def test_bad_requests_are_rejected_and_serving_continues(server, client, case):
    body = {"model": NAME, "prompt": "hello", "max_tokens": 4}
    raw = None
    if case == "too_long":
        body["prompt"] = "hello " * (MAX_MODEL_LEN * 2)
    elif case == "negative_max_tokens":
        body["max_tokens"] = -1
    elif case == "bad_top_p":
        body["top_p"] = 1.5
    elif case == "negative_temperature":
        body["temperature"] = -0.5
    elif case == "malformed_json":
        raw = '{"model": "tiny", "prompt": '
    else:
        body["model"] = "no-such-model"
    r = _post(server, "/v1/completions", body, raw=raw)
    # vLLM answers an unknown model name with 404 (NotFoundError), as it does on CUDA
    assert r.status_code == (404 if case == "unknown_model" else 400), r.text
    assert "error" in r.json() and r.json()["error"]["message"]
    assert _greedy(client, PROMPTS[0], max_tokens=4)  # the next good request succeeds


def test_api_key_is_enforced(server):
    r = _post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2},
              key=None)
    assert r.status_code == 401
    r = _post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2},
              key="wrong")
    assert r.status_code == 401


# `vllm serve --runner pooling`: /v1/embeddings of a tiny BERT (encoder-only attention)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "registry_sweep", os.path.join(ROOT, "tools", "registry_sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    path = str(tmp_path_factory.mktemp("tiny-bert") / "BertModel")
    sweep.build_checkpoint("BertModel", path, seed=0)
    return path


@pytest.fixture(scope="module")
def embedding_server(bert):
    srv = Server(bert, name=NAME, extra_args=("--runner", "pooling", "--max-model-len", "256"))
    srv.start()
    yield srv
    srv.stop()


def test_embeddings_endpoint_equals_offline_embed(embedding_server, bert):
    prompt = PROMPTS[1]
    served = embedding_server.client().embeddings.create(model=NAME, input=[prompt])
    code = textwrap.dedent(f"""
        import json
        from vllm import LLM
        llm = LLM(model={bert!r}, runner="pooling", max_model_len=256, seed=0)
        print("RESULT " + json.dumps(llm.embed([{prompt!r}])[0].outputs.embedding))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    offline = json.loads(next(l for l in out.stdout.splitlines()
                              if l.startswith("RESULT "))[len("RESULT "):])
    got = served.data[0].embedding
    assert len(got) == len(offline) == 128
    cosine = sum(a * b for a, b in zip(got, offline)) / (
        sum(a * a for a in got) ** 0.5 * sum(b * b for b in offline) ** 0.5)
    assert cosine >= 0.9999


# `vllm serve --async-scheduling` with TORCH_MLX_ASYNC=1 (launched steps, the engine a step
# ahead): the same text as the default server, for concurrent streams, and an aborted stream
@pytest.fixture(scope="module")
def async_sched_server(model):
    srv = Server(model, name=NAME, api_key=API_KEY, env={"TORCH_MLX_ASYNC": "1"},
                 extra_args=("--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "32",
                             "--async-scheduling"))
    srv.start()
    yield srv
    srv.stop()


def test_async_scheduling_server_equals_default(server, client, async_sched_server):
    prompts = [PROMPTS[i % len(PROMPTS)] + f" #{i}" for i in range(16)]
    expected = [_greedy(client, p, max_tokens=8 + i) for i, p in enumerate(prompts)]

    async def one(aclient, prompt, max_tokens):
        stream = await aclient.completions.create(model=NAME, prompt=prompt,
                                                  max_tokens=max_tokens, temperature=0.0,
                                                  stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def all_at_once():
        aclient = async_sched_server.async_client()
        return await asyncio.gather(*(one(aclient, p, 8 + i) for i, p in enumerate(prompts)))

    assert asyncio.run(all_at_once()) == expected
    # a stream closed mid-way: the engine aborts the request and serves the next
    with requests.post(async_sched_server.url + "/v1/completions", stream=True, timeout=300,
                       headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": NAME, "prompt": PROMPTS[1], "max_tokens": 200,
                             "temperature": 0.0, "stream": True, "ignore_eos": True}) as r:
        assert next(r.iter_lines()).startswith(b"data:")
    async_client = async_sched_server.client()
    assert _greedy(async_client, PROMPTS[0]) == _greedy(client, PROMPTS[0])
