"""lm-evaluation-harness (`lm-eval`, model `local-completions` with its default tokenizer mode) against the server:
it finds GET /tokenizer_info and tokenizes remotely, and its multiple-choice accuracy and rolling log-likelihood equal
what `llmasos eval multiple-choice` and `llmasos eval perplexity` give in process on the same data. Fully offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, REPO_ROOT, assert_error, cli, start_service
from support import family_config, make_checkpoint

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[test]')")

pytestmark = pytest.mark.slow
DATABASES = ("sqlite",)  # lm-eval's numbers against ours: no key, no usage row; the database has nothing to do with it

MC_DATA = REPO_ROOT / "evals" / "tiny_mc.jsonl"
TEXT_DATA = REPO_ROOT / "evals" / "tiny_text.jsonl"
MAX_LENGTH = 256  # the checkpoints' context: every text of TEXT_DATA fits in one window, for lm-eval and for us

MC_TASK = """
task: llmasos_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""

ROLLING_TASK = """
task: llmasos_tiny_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network: the Hub and datasets work from local files only, with caches of the test's own."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")


@pytest.fixture(scope="module")
def no_bos_checkpoint(tmp_path_factory) -> Path:
    """A tokenizer that adds no BOS: lm-eval's remote tokenizer never asks for special tokens, while `llmasos eval
    multiple-choice` tokenizes with them, so only without a BOS do both score the very same token ids."""
    directory = tmp_path_factory.mktemp("checkpoints") / "tiny-no-bos"
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=MAX_LENGTH),
                    seed=5, add_bos=False)
    return directory


def run_lm_eval(service, task_yaml: str, task_name: str, tmp_path: Path, **options) -> dict:
    from lm_eval.tasks import TaskManager

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / f"{task_name}.yaml").write_text(task_yaml)
    model_args = {"base_url": f"{service.base_url}/v1/completions", "model": MODEL, "max_length": MAX_LENGTH,
                  "num_concurrent": 1, "max_retries": 1, **options}  # tokenizer_backend left at its default, "auto"
    return lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=[task_name],
                                   task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
                                   batch_size=1, bootstrap_iters=0)


def llmasos_eval(*args: str) -> dict:
    return json.loads(cli("eval", *args, "--dtype", "float32", "--json").stdout)


def test_lm_eval_finds_the_remote_tokenizer(home, checkpoint):
    from lm_eval.utils import check_remote_tokenizer_support

    service = start_service({MODEL: checkpoint})
    try:
        assert check_remote_tokenizer_support(f"{service.base_url}/v1/completions")
        info = httpx.get(f"{service.base_url}/tokenizer_info").json()
        assert info["eos_token"] == "<|eos|>" and info["bos_token"] == "<|bos|>"
        assert info["model_max_length"] == MAX_LENGTH and "<|im_start|>" in info["chat_template"]
    finally:
        service.stop()


def test_model_is_optional_only_while_one_model_generates(home, checkpoint, other_checkpoint):
    service = start_service({MODEL: checkpoint, "other": other_checkpoint})
    try:
        url = service.base_url
        for response in (httpx.post(f"{url}/tokenize", json={"prompt": "hello"}),
                         httpx.post(f"{url}/detokenize", json={"tokens": [5]}), httpx.get(f"{url}/tokenizer_info")):
            error = assert_error(response, 400)
            assert error["param"] == "model" and "'tiny'" in error["message"] and "'other'" in error["message"]
        named = httpx.post(f"{url}/tokenize", json={"model": "other", "prompt": "hello"})
        assert named.status_code == 200 and named.json()["tokens"]
        assert httpx.get(f"{url}/tokenizer_info", params={"model": "other"}).json()["model"] == "other"
        assert_error(httpx.get(f"{url}/tokenizer_info", params={"model": "nope"}), 404, code="model_not_found")
        error = assert_error(httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": []}), 400)
        assert error["param"] == "messages"
    finally:
        service.stop()


def test_multiple_choice_accuracy_equals_llmasos_eval(home, no_bos_checkpoint, tmp_path):
    service = start_service({MODEL: no_bos_checkpoint})
    try:
        results = run_lm_eval(service, MC_TASK.format(data=MC_DATA), "llmasos_tiny_mc", tmp_path)
    finally:
        service.stop()
    assert results["config"]["model_args"]["max_length"] == MAX_LENGTH
    scores = results["results"]["llmasos_tiny_mc"]
    ours = llmasos_eval("multiple-choice", "--data", str(MC_DATA), "--model", str(no_bos_checkpoint))
    assert ours["num_examples"] == len(results["samples"]["llmasos_tiny_mc"]) == 8
    # Accuracy is a count of argmaxes over the same token ids and the same float32 weights: exactly equal.
    assert scores["acc,none"] == ours["metrics"]["accuracy"]
    assert scores["acc_norm,none"] == ours["metrics"]["accuracy_norm"]


def test_rolling_loglikelihood_equals_llmasos_eval_perplexity(home, checkpoint, tmp_path):
    service = start_service({MODEL: checkpoint})
    try:
        # lm-eval 0.4.13's remote tokenizer takes `bos_token_id or eos_token_id` as the rolling windows' prefix, which
        # drops a BOS whose id is 0 (as here) for the EOS; so the BOS is named, as for the prefix we tokenize with.
        bos_id = httpx.post(f"{service.base_url}/tokenize", json={"prompt": "<|bos|>", "add_special_tokens": False})
        results = run_lm_eval(service, ROLLING_TASK.format(data=TEXT_DATA), "llmasos_tiny_text", tmp_path,
                              custom_prefix_token_id=bos_id.json()["tokens"][0])
    finally:
        service.stop()
    samples = results["samples"]["llmasos_tiny_text"]
    loglikelihood = math.fsum(sample["filtered_resps"][0] if isinstance(sample["filtered_resps"], list)
                              else sample["filtered_resps"] for sample in samples)
    ours = llmasos_eval("perplexity", "--data", str(TEXT_DATA), "--model", str(checkpoint),
                        "--context-length", str(MAX_LENGTH))
    assert len(samples) == ours["num_examples"] == 5
    assert ours["settings"]["num_windows"] == 5  # one window per text, as lm-eval's single rolling window
    # Both score each text once from [BOS] + its tokens (lm-eval prefixes the BOS, we tokenize with it), so the sums
    # are of the same float32 log-probabilities, differing only by batch composition (the CLI scores 5 windows in a
    # batch, lm-eval one request at a time): ~1e-6 relative per token, far inside 1e-4 on the total.
    nll = math.log(ours["metrics"]["perplexity"]) * ours["settings"]["num_tokens"]
    assert -loglikelihood == pytest.approx(nll, rel=1e-4)
    scores = results["results"]["llmasos_tiny_text"]
    assert scores["bits_per_byte,none"] == pytest.approx(ours["metrics"]["bits_per_byte"], rel=1e-4)
