"""`llmasos.pipeline`: task names and aliases, the right kind of model loaded for a path or a library name, loaded
models reused, options checked before any loading, and call options overriding the pipeline's."""

from __future__ import annotations

import pytest

import llmasos
from llmasos.embeddings import Embedder
from llmasos.llm import LLM
from llmasos.pipelines import (
    ChatPipeline,
    EmbeddingsPipeline,
    Seq2SeqLM,
    TextGenerationPipeline,
    TranslationPipeline,
    pipeline,
)


def test_exported_from_the_package():
    assert llmasos.pipeline is pipeline


def test_each_kind_of_checkpoint_loads_its_backend(chat_checkpoint, t5_checkpoint, sentence_checkpoint):
    assert isinstance(pipeline("text-generation", model=str(chat_checkpoint[0])).model, LLM)
    assert isinstance(pipeline("summarization", model=t5_checkpoint[0]).model, Seq2SeqLM)
    embed = pipeline("feature-extraction", model=sentence_checkpoint)
    assert isinstance(embed, EmbeddingsPipeline) and isinstance(embed.model, Embedder)


def test_library_names_resolve(chat_checkpoint):
    from llmasos.library.importer import import_directory

    import_directory(chat_checkpoint[0], "tiny-chat")
    gen = pipeline("text-generation", model="tiny-chat")
    assert gen.model.path.name != chat_checkpoint[0].name  # the store's copy
    expected = pipeline("text-generation", model=chat_checkpoint[0])("To be", max_new_tokens=4)
    assert gen("To be", max_new_tokens=4) == expected


def test_task_names_and_aliases(chat_llm):
    assert isinstance(pipeline("conversational", model=chat_llm), ChatPipeline)
    translate = pipeline("translation_de_to_en", model=chat_llm)
    assert isinstance(translate, TranslationPipeline)
    assert translate.options == {"src_lang": "de", "tgt_lang": "en"}
    with pytest.raises(ValueError, match="unknown task 'sentiment'.*text-generation"):
        pipeline("sentiment", model=chat_llm)


def test_options_are_checked_before_loading():
    with pytest.raises(ValueError, match="unknown option 'num_beam_groups' for the summarization pipeline"):
        pipeline("summarization", model="/no/such/model", num_beam_groups=4)


def test_call_options_override_pipeline_options(chat_llm):
    gen = pipeline("text-generation", model=chat_llm, max_new_tokens=2, return_full_text=False)
    assert isinstance(gen, TextGenerationPipeline)
    short = gen("To be", return_tensors=True)[0]["generated_token_ids"]
    longer = gen("To be", max_new_tokens=5, return_tensors=True)[0]["generated_token_ids"]
    assert len(short) <= 2 and len(longer) <= 5 and longer[:len(short)] == short
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        gen("To be", bogus=1)


def test_missing_model_is_a_clear_error():
    with pytest.raises(ValueError, match="not found"):
        pipeline("text-generation", model="/no/such/model")
