"""The engine core in a process of its own: the same outputs as in process on the engine suite's mixed load, stats
that travel with the outputs, refusals named up front, and no orphan when the parent is killed with -9."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from test_llm_engine import greedy, random_prompts

from llmasos import LLM, SamplingParams
from llmasos.engine.core_client import EngineStartError, MPClient
from llmasos.engine.validation import ContextLengthError
from llmasos.spec import resolve_spec

MIXED_LOAD = dict(dtype="float32", num_kv_blocks=600, max_num_batched_tokens=64, max_num_seqs=16)


@pytest.fixture(scope="module")
def remote(tiny_checkpoint):
    llm = LLM.load(tiny_checkpoint, engine_process=True, **MIXED_LOAD)
    yield llm
    llm.close()


def test_the_engine_runs_in_another_process(remote):
    client = remote.engine.client
    assert isinstance(client, MPClient) and client.process.pid != os.getpid()
    assert remote.engine.info.pid == client.process.pid and remote.model is None
    assert remote.num_parameters > 0 and remote.metrics()["weight_bytes"] > 0


def test_engine_process_and_in_process_give_identical_outputs_on_a_mixed_load(tiny_checkpoint, remote):
    rng = random.Random(1)
    prompts = random_prompts(40, 1, 150, seed=1)
    params = [greedy(rng.randint(1, 40), logprobs=2) for _ in prompts]
    params[3] = SamplingParams(max_tokens=30, temperature=0.8, seed=5, n=3)  # seeded sampling, n > 1
    local = LLM.load(tiny_checkpoint, **MIXED_LOAD)
    expected = local.generate(prompts, params)
    got = remote.generate(prompts, params)
    for mine, theirs in zip(got, expected, strict=True):
        assert [o.token_ids for o in mine.outputs] == [o.token_ids for o in theirs.outputs]
        assert [o.text for o in mine.outputs] == [o.text for o in theirs.outputs]
        assert [o.finish_reason for o in mine.outputs] == [o.finish_reason for o in theirs.outputs]
        for a, b in zip(mine.outputs[0].logprobs or [], theirs.outputs[0].logprobs or [], strict=True):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)
    stats = remote.metrics()
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0.0  # reported by the engine after the last step
    assert stats["num_generated_tokens"] >= sum(len(o.token_ids) for r in got for o in r.outputs)


def test_stop_strings_and_prompt_scores_are_the_same_across_the_process_boundary(tiny_checkpoint, remote):
    local = LLM.load(tiny_checkpoint, **MIXED_LOAD)
    free = local.generate("The quick brown fox", greedy(30, ignore_eos=True))[0]
    stop = free.text[10:13]
    stopped = [llm.generate("The quick brown fox", greedy(30, ignore_eos=True, stop=[stop]))[0]
               for llm in (local, remote)]
    assert stopped[0].text == stopped[1].text == free.text[:free.text.find(stop)]
    assert stopped[0].token_ids == stopped[1].token_ids
    ids = random_prompts(1, 200, 200, seed=9)[0]  # longer than the token budget: scored in chunks
    ours, theirs = remote.prompt_logprobs(ids, top_k=3), local.prompt_logprobs(ids, top_k=3)
    assert ours[0] is None and len(ours) == len(ids)
    assert [lp for lp, _ in ours[1:]] == pytest.approx([lp for lp, _ in theirs[1:]], abs=1e-5)
    assert [sorted(top) for _, top in ours[1:]] == [sorted(top) for _, top in theirs[1:]]


def test_requests_the_engine_could_never_run_are_refused_before_they_are_sent(remote):
    with pytest.raises(ContextLengthError, match="maximum context length is 512"):
        remote.generate([5] * 500, greedy(20))
    assert remote.generate([5, 6, 7], greedy(3))[0].finish_reason == "length"  # the engine is still fine


def test_a_model_that_cannot_load_names_the_reason(tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_checkpoint / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EngineStartError, match="could not load broken"):
        MPClient(resolve_spec(broken, dtype="float32", num_kv_blocks=8), startup_timeout=120)


def test_an_engine_process_exits_by_itself_when_its_parent_is_killed(tiny_checkpoint, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from llmasos import LLM
        llm = LLM.load({str(tiny_checkpoint)!r}, dtype="float32", num_kv_blocks=16, engine_process=True)
        print(llm.engine.client.process.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        engine_pid = int(parent.stdout.readline())
        assert psutil.pid_exists(engine_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        killed_at = time.monotonic()
        while _running(engine_pid) and time.monotonic() - killed_at < 10:
            time.sleep(0.05)
        assert not _running(engine_pid)
        assert time.monotonic() - killed_at < 5
    finally:
        if parent.poll() is None:
            parent.kill()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
