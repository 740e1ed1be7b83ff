"""Pipeline fixtures: tiny random checkpoints of each kind (a chat decoder, a base decoder without chat template,
a T5 with task_specific_params, a sentence-transformers BERT), each loaded once per session."""

from __future__ import annotations

import pytest
from encoders_support import make_sentence_transformer, make_t5_checkpoint, t5_config
from support import family_config, make_checkpoint

T5_TASKS = {"translation_en_to_fr": {"prefix": "translate English to French: ", "max_length": 12},
            "summarization": {"prefix": "summarize: ", "max_length": 10, "min_length": 3}}


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("LLMASOS_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory):
    """(directory, transformers model): a 2-layer qwen2 with the ChatML test template."""
    directory = tmp_path_factory.mktemp("chat-qwen2")
    reference = make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=256))
    return directory, reference


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """A gpt2 without a chat template: task prompts go to it as plain completions."""
    directory = tmp_path_factory.mktemp("base-gpt2")
    make_checkpoint(directory, family_config("gpt2", n_layer=2), chat_template=None)
    return directory


@pytest.fixture(scope="session")
def t5_checkpoint(tmp_path_factory):
    """(directory, transformers model): a T5 v1.1-style model whose config carries task prefixes."""
    directory = tmp_path_factory.mktemp("t5")
    reference = make_t5_checkpoint(directory, t5_config(feed_forward_proj="gated-gelu"), task_specific_params=T5_TASKS)
    return directory, reference


@pytest.fixture(scope="session")
def sentence_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sentence-bert")
    make_sentence_transformer(directory)
    return directory


@pytest.fixture(scope="session")
def chat_llm(chat_checkpoint):
    from llmasos import LLM

    return LLM.load(chat_checkpoint[0], dtype="float32")


@pytest.fixture(scope="session")
def base_llm(base_checkpoint):
    from llmasos import LLM

    return LLM.load(base_checkpoint, dtype="float32")


@pytest.fixture(scope="session")
def t5(t5_checkpoint):
    from llmasos.pipelines import Seq2SeqLM

    return Seq2SeqLM.load(t5_checkpoint[0], dtype="float32")
