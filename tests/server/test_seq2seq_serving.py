"""An encoder-decoder (T5) library model on POST /v1/completions of a real server, loaded on its first request: greedy
text and usage equal transformers' `generate`, streams (token by token) add up to the whole answer, seeded sampling
and beam search work through the official openai client, a keyed request writes its usage row, and what T5 cannot do
(chat without a template, max_tokens 0, echo, beams on a decoder-only model) is an OpenAI-shaped 400."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import httpx
import openai
import pytest
import torch
from conftest import REPO_ROOT, assert_error, free_port, openai_client, sse_events, wait_until, wait_until_healthy
from encoders_support import make_t5_checkpoint, t5_tokenizer
from support import family_config, make_checkpoint

from llmasos import SamplingParams
from llmasos.engine.async_llm import EngineDeadError
from llmasos.library.importer import import_directory
from llmasos.pipelines.seq2seq import Seq2SeqLM
from llmasos.server import auth
from llmasos.server.lifecycle import ModelManager
from llmasos.server.seq2seq_serving import Seq2SeqService
from llmasos.server.serving import Service
from llmasos.server.state import ServerSettings

T5 = "t5-tiny"
T5_CHAT = "t5-chat"  # the same weights with a chat template
DECODER = "tiny-decoder"
TEXTS = ["translate English to German: a house by the sea", "To be, or not to be, that is the question"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The transformers model, saved as a checkpoint with its tokenizer."""
    directory = tmp_path_factory.mktemp("seq2seq") / "t5"
    return directory, make_t5_checkpoint(directory, seed=4)


@pytest.fixture(scope="module")
def service(home, reference, tmp_path_factory):
    """A server over the library (the T5 and a decoder-only model imported), nothing loaded until asked for."""
    decoder = tmp_path_factory.mktemp("seq2seq") / "decoder"
    make_checkpoint(decoder, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=256))
    import_directory(reference[0], T5)
    chat = tmp_path_factory.mktemp("seq2seq") / "t5-chat"
    shutil.copytree(reference[0], chat)
    (chat / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}</s>")
    import_directory(chat, T5_CHAT)
    import_directory(decoder, DECODER)
    manager = ModelManager(library=True, load_options={"dtype": "float32"}, keep_alive=600.0)
    service = Service(manager, ServerSettings(host="127.0.0.1", port=free_port())).start()
    yield service
    service.stop()


def transformers_greedy(model, text: str, max_new_tokens: int, **options) -> tuple[list[int], list[int]]:
    """(encoder input ids, generated ids without the decoder start token, cut after </s>)."""
    ids = t5_tokenizer()(text)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, use_cache=False,
                             **options)  # its cache breaks with num_decoder_layers != num_layers
    generated = out[0, 1:].tolist()
    return ids, generated[:generated.index(1) + 1] if 1 in generated else generated


def post(service: Service, body: dict, path: str = "/v1/completions", **headers) -> httpx.Response:
    return httpx.post(service.base_url + path, json=body, headers=headers, timeout=120)


def test_loaded_on_demand_and_listed(service):
    cards = {card["id"]: card for card in httpx.get(service.base_url + "/v1/models").json()["data"]}
    assert T5 in cards and not cards[T5]["loaded"]
    assert post(service, {"model": T5, "prompt": "hello", "max_tokens": 2}).status_code == 200
    card = httpx.get(service.base_url + f"/v1/models/{T5}").json()
    assert card["loaded"] and card["max_model_len"] == 512


@pytest.mark.parametrize("max_tokens", [6, 24])
def test_greedy_text_and_usage_equal_transformers(service, reference, max_tokens):
    client = openai_client(service)
    for text in TEXTS:
        ids, generated = transformers_greedy(reference[1], text, max_tokens)
        response = client.completions.create(model=T5, prompt=text, max_tokens=max_tokens, temperature=0)
        choice = response.choices[0]
        assert response.object == "text_completion" and response.model == T5
        assert choice.text == t5_tokenizer().decode(generated, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if generated[-1] == 1 else "length")
        assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), len(generated))
        assert response.usage.total_tokens == len(ids) + len(generated)
    # A list of prompts: one choice each, in order, and usage summed over them.
    both = client.completions.create(model=T5, prompt=TEXTS, max_tokens=max_tokens, temperature=0)
    singles = [client.completions.create(model=T5, prompt=t, max_tokens=max_tokens, temperature=0) for t in TEXTS]
    assert [c.text for c in both.choices] == [s.choices[0].text for s in singles]
    assert both.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_stream_adds_up_to_the_whole_answer_token_by_token(service):
    client = openai_client(service)
    for options in ({"temperature": 0}, {"temperature": 1.0, "seed": 11, "n": 2, "top_p": 0.9}):
        whole = client.completions.create(model=T5, prompt=TEXTS[1], max_tokens=20, **options)
        chunks = list(client.completions.create(model=T5, prompt=TEXTS[1], max_tokens=20, stream=True,
                                                stream_options={"include_usage": True}, **options))
        texts: dict[int, str] = {}
        finishes: dict[int, str] = {}
        for chunk in chunks[:-1]:
            assert chunk.object == "text_completion" and chunk.id == chunks[0].id
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
        assert texts == {c.index: c.text for c in whole.choices}
        assert finishes == {c.index: c.finish_reason for c in whole.choices}
        assert chunks[-1].usage == whole.usage and not chunks[-1].choices
        # Token by token: as many chunks with text as tokens that made text (one per step, a slow client aside).
        with_text = sum(1 for chunk in chunks[:-1] for choice in chunk.choices if choice.text)
        assert with_text > len(whole.choices)


def test_stop_strings_and_seeded_sampling(service):
    client = openai_client(service)
    full = client.completions.create(model=T5, prompt=TEXTS[0], max_tokens=20, temperature=0).choices[0]
    stop = full.text[3:6]
    assert len(stop) == 3 and stop.strip()
    cut = client.completions.create(model=T5, prompt=TEXTS[0], max_tokens=20, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    sampled = [client.completions.create(model=T5, prompt=TEXTS[0], max_tokens=12, temperature=1.0, seed=5, n=3)
               for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert len(sampled[0].choices) == 3 and len({c.text for c in sampled[0].choices}) > 1


def test_beam_search_equals_transformers(service, reference):
    client = openai_client(service)
    ids, expected = transformers_greedy(reference[1], TEXTS[0], 10, num_beams=3, length_penalty=1.0,
                                        early_stopping=True)
    response = client.completions.create(model=T5, prompt=TEXTS[0], max_tokens=10,
                                         extra_body={"num_beams": 3, "early_stopping": True})
    assert response.choices[0].text == t5_tokenizer().decode(expected, skip_special_tokens=True)
    assert response.usage.completion_tokens == len(expected)
    streamed = list(client.completions.create(model=T5, prompt=TEXTS[0], max_tokens=10, stream=True,
                                              extra_body={"num_beams": 3, "early_stopping": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == response.choices[0].text
    two = client.completions.create(model=T5, prompt=TEXTS[0], max_tokens=10, n=2, extra_body={"num_beams": 3})
    assert len(two.choices) == 2 and two.choices[0].text != two.choices[1].text


def test_chat_through_a_chat_template_is_the_completion_of_its_rendering(service):
    client = openai_client(service)
    completion = client.completions.create(model=T5, prompt=TEXTS[1], max_tokens=9, temperature=0)
    chat = client.chat.completions.create(model=T5_CHAT, messages=[{"role": "user", "content": TEXTS[1]}],
                                          max_tokens=9, temperature=0)
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage == completion.usage and chat.choices[0].finish_reason == completion.choices[0].finish_reason
    chunks = list(client.chat.completions.create(model=T5_CHAT, messages=[{"role": "user", "content": TEXTS[1]}],
                                                 max_tokens=9, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == completion.choices[0].text
    error = assert_error(post(service, {"model": T5_CHAT, "messages": [{"role": "user", "content": "hi"}],
                                        "tools": [{"type": "function", "function": {"name": "f"}}]},
                              "/v1/chat/completions"), 400)
    assert error["param"] == "tools"


def test_requests_decode_first_come_first_served_and_fail_when_the_model_stops(reference):
    """The service alone: one worker decodes request after request in arrival order; stopping it ends the request
    decoding now and the waiting ones with EngineDeadError (no caller waits forever)."""
    service = Seq2SeqService(Seq2SeqLM.load(reference[0], dtype="float32"), 512)
    ids = service.tokenizer.encode(TEXTS[0])
    short = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)

    async def finishing_order() -> list[str]:
        order: list[str] = []

        async def one(name: str) -> None:
            async for delta in service.generate(ids, short, name):
                if delta.finished:
                    order.append(name)

        await asyncio.gather(*(one(f"r{i}") for i in range(4)))
        return order

    assert asyncio.run(finishing_order()) == ["r0", "r1", "r2", "r3"]
    assert service.num_in_flight == 0 and service.metrics()["num_waiting"] == 0
    wait_until(lambda: service.metrics()["num_running"] == 0)  # set by the worker just after the last delta

    async def stopped_midway() -> list:
        long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)

        async def one(name: str, stop: bool):
            async for _ in service.generate(ids, long, name):
                if stop:  # the first delta is out: stop the model (as an unload does, off the event loop)
                    await asyncio.to_thread(service.shutdown)
            return name

        return await asyncio.gather(one("running", True), one("waiting", False), return_exceptions=True)

    results = asyncio.run(stopped_midway())
    assert [type(result) for result in results] == [EngineDeadError, EngineDeadError]
    assert not service.is_alive


def test_what_a_seq2seq_model_does_not_do_is_an_openai_400(service):
    client = openai_client(service)
    with pytest.raises(openai.BadRequestError, match="encoder-decoder"):
        client.chat.completions.create(model=T5, messages=[{"role": "user", "content": "hi"}])
    error = assert_error(post(service, {"model": T5, "messages": [{"role": "user", "content": "hi"}]},
                              "/v1/chat/completions"), 400, "invalid_request_error", "model_not_supported")
    assert error["param"] == "model" and "/v1/completions" in error["message"]
    for max_tokens in (0, -1):
        error = assert_error(post(service, {"model": T5, "prompt": "x", "max_tokens": max_tokens}), 400)
        assert error["param"] == "max_tokens"
    assert assert_error(post(service, {"model": T5, "prompt": "x", "echo": True}), 400)["param"] == "echo"
    assert assert_error(post(service, {"model": T5, "prompt": [5, 999999]}), 400)["param"] == "prompt"
    error = assert_error(post(service, {"model": T5, "prompt": "x " * 600}), 400, code="context_length_exceeded")
    assert "512" in error["message"]
    error = assert_error(post(service, {"model": T5, "prompt": "x", "max_tokens": 513}), 400,
                         code="context_length_exceeded")
    assert error["param"] == "prompt"
    error = assert_error(post(service, {"model": T5, "prompt": "x", "num_beams": 2, "n": 3}), 400)
    assert error["param"] == "n"
    error = assert_error(post(service, {"model": T5, "prompt": "x", "num_beams": 2, "temperature": 0.7}), 400)
    assert error["param"] == "temperature"
    error = assert_error(post(service, {"model": DECODER, "prompt": "x", "num_beams": 2}), 400)
    assert error["param"] == "num_beams"
    error = assert_error(post(service, {"model": T5, "prompt": "x", "response_format": {"type": "json_object"}}), 400)
    assert error["param"] == "response_format"
    error = assert_error(post(service, {"model": T5, "prompt": "x", "num_beams": 2, "logprobs": 1}), 400)
    assert error["param"] == "logprobs"


def test_eos_ends_a_choice_with_stop_and_is_counted(service):
    """The random model rarely ends by itself: a bias on </s> (id 1) makes it. </s> is a token, not text."""
    client = openai_client(service)
    response = client.completions.create(model=T5, prompt=TEXTS[0], max_tokens=10, temperature=0,
                                         logit_bias={"1": 100}, logprobs=0)
    choice = response.choices[0]
    assert (choice.text, choice.finish_reason, response.usage.completion_tokens) == ("", "stop", 1)
    assert len(choice.logprobs.token_logprobs) == 1 and choice.logprobs.token_logprobs[0] <= 0
    held = client.completions.create(model=T5, prompt=TEXTS[0], max_tokens=10, temperature=0, logit_bias={"1": 100},
                                     extra_body={"min_tokens": 3})
    assert (held.choices[0].finish_reason, held.usage.completion_tokens) == ("stop", 4)
    ignored = client.completions.create(model=T5, prompt=TEXTS[0], max_tokens=10, temperature=0,
                                        logit_bias={"1": 100}, extra_body={"ignore_eos": True})
    assert (ignored.choices[0].finish_reason, ignored.usage.completion_tokens) == ("length", 10)


def generated_tokens(service: Service) -> float:
    for line in httpx.get(service.base_url + "/metrics").text.splitlines():
        if line.startswith(f'llmasos_generation_tokens_total{{model="{T5}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_goes_away_stops_the_decoding(service):
    """The worker stops after the step in flight: the model is idle at once, and only what was sent is metered."""
    assert post(service, {"model": T5, "prompt": "x", "max_tokens": 1}).status_code == 200  # loaded
    served = service.manager.loaded()[T5]
    before = generated_tokens(service)
    body = {"model": T5, "prompt": TEXTS[1], "max_tokens": 512, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", service.base_url + "/v1/completions",
                                                           json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")
    wait_until(lambda: served.llm.num_in_flight == 0 and served.llm.metrics()["num_running"] == 0, timeout=10)
    assert 1 <= generated_tokens(service) - before < 512


@pytest.mark.slow
def test_llmasos_serve_model_dir_serves_a_t5(home, reference):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llmasos", "serve", "--model", str(reference[0]),
                                "--served-model-name", "t5-dir", "--port", str(port), "--dtype", "float32"],
                               cwd=REPO_ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["t5-dir"]
        _, generated = transformers_greedy(reference[1], TEXTS[0], 8)
        answer = client.completions.create(model="t5-dir", prompt=TEXTS[0], max_tokens=8, temperature=0)
        assert answer.choices[0].text == t5_tokenizer().decode(generated, skip_special_tokens=True)
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_keyed_request_is_admitted_and_metered(service):
    """Last in this module: once a key exists, every request needs one."""
    key = auth.create_key("seq2seq-user")
    wait_until(lambda: httpx.get(service.base_url + "/v1/models").status_code == 401, timeout=5)
    client = openai_client(service, key)
    seen = [client.completions.create(model=T5, prompt=TEXTS[0], max_tokens=7, temperature=0).usage]
    stream = client.completions.create(model=T5, prompt=TEXTS, max_tokens=5, stream=True,
                                       stream_options={"include_usage": True})
    seen.append(list(stream)[-1].usage)
    rows = [row for row in auth.usage_summary("seq2seq-user") if row["model"] == T5]
    assert sum(row["requests"] for row in rows) == 2
    assert sum(row["prompt_tokens"] for row in rows) == sum(u.prompt_tokens for u in seen)
    assert sum(row["completion_tokens"] for row in rows) == sum(u.completion_tokens for u in seen)
    response = post(service, {"model": T5, "prompt": "x", "max_tokens": 2})
    assert_error(response, 401)
    # A token quota caps the decoder as it caps a decoder-only model, then refuses.
    prompt_tokens = len(t5_tokenizer()(TEXTS[0])["input_ids"])
    quota = openai_client(service, auth.create_key("seq2seq-quota", token_quota=prompt_tokens + 5))
    capped = quota.completions.create(model=T5, prompt=TEXTS[0], max_tokens=20, temperature=0, extra_body={
        "ignore_eos": True})
    assert (capped.usage.completion_tokens, capped.choices[0].finish_reason) == (5, "length")
    with pytest.raises(openai.RateLimitError, match="quota"):
        quota.completions.create(model=T5, prompt=TEXTS[0], max_tokens=20)
    events = list(sse_events(httpx.post(service.base_url + "/v1/completions", timeout=60,
                                        headers={"Authorization": f"Bearer {key}"},
                                        json={"model": T5, "prompt": "hi", "max_tokens": 3, "stream": True})))
    assert events[-1] == "[DONE]"
