"""text-classification, fill-mask and extractive question-answering pipelines (llmasos/pipelines/task_models.py,
extractive_qa.py) against transformers on tiny random checkpoints: the same labels, tokens, answers and scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from encoders_support import bert_tokenizer
from support import VOCAB_SIZE, family_config, hf_tokenizer

from llmasos.pipelines import ExtractiveQuestionAnsweringPipeline, QuestionAnsweringPipeline, pipeline

BERT_INPUTS = ["input_ids", "token_type_ids", "attention_mask"]
TEXTS = ["to be or not to be", "the quick brown fox jumps over the lazy dog", "outrageous fortune"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def bert_config(**overrides):
    import transformers as tf

    base = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    return tf.BertConfig(**{**base, **overrides})


def save(model, directory, tokenizer):
    with torch.no_grad():  # random heads give near-uniform outputs; these weights give clear, distinct scores
        for name, param in model.named_parameters():
            if "classifier" in name or "score" in name or "qa_outputs" in name:
                param.mul_(40)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bert_classifier(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(bert_config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()}))
    return save(model, tmp_path_factory.mktemp("bert-cls"), bert_tokenizer())


@pytest.fixture(scope="module")
def qwen2_classifier(tmp_path_factory):
    import transformers as tf

    config = family_config("qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, id2label=LABELS,
                           label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(1)
    return save(tf.Qwen2ForSequenceClassification(config), tmp_path_factory.mktemp("qwen2-cls"),
                hf_tokenizer(add_bos=False))


@pytest.fixture(scope="module")
def roberta_classifier(tmp_path_factory):
    import transformers as tf

    config = tf.RobertaConfig(**{**bert_config().to_dict(), "pad_token_id": 2, "max_position_embeddings": 64,
                                 "type_vocab_size": 1, "id2label": LABELS,
                                 "label2id": {v: k for k, v in LABELS.items()}})
    torch.manual_seed(5)
    return save(tf.RobertaForSequenceClassification(config), tmp_path_factory.mktemp("roberta-cls"),
                hf_tokenizer(add_bos=True))


def hf_pipeline(task: str, directory, **options):
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(directory, model_input_names=BERT_INPUTS)
    return tf.pipeline(task, model=str(directory), tokenizer=tokenizer, device="cpu", **options)


def assert_same(ours, theirs, atol=1e-5):
    if isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (ours, theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert_same(a, b, atol)
    elif isinstance(theirs, dict):
        assert set(ours) == set(theirs), (ours, theirs)
        for key, value in theirs.items():
            assert_same(ours[key], value, atol)
    elif isinstance(theirs, float):
        assert ours == pytest.approx(theirs, abs=atol)
    else:
        assert ours == theirs


@pytest.mark.parametrize("fixture", ["bert_classifier", "qwen2_classifier", "roberta_classifier"])
def test_text_classification_equals_transformers(fixture, request):
    directory = request.getfixturevalue(fixture)
    ours, theirs = pipeline("text-classification", model=directory), hf_pipeline("text-classification", directory)
    assert_same(ours(TEXTS[0]), theirs(TEXTS[0]))
    assert_same(ours(TEXTS), theirs(TEXTS))
    assert_same(ours(TEXTS, top_k=None), theirs(TEXTS, top_k=None))
    assert_same(ours(TEXTS[1], top_k=2), theirs(TEXTS[1], top_k=2))
    assert_same(ours(TEXTS, function_to_apply="sigmoid"), theirs(TEXTS, function_to_apply="sigmoid"))
    pair = {"text": TEXTS[0], "text_pair": TEXTS[2]}
    assert_same(ours(pair), theirs(pair))
    assert_same(ours([pair, {"text": TEXTS[1]}]), theirs([pair, {"text": TEXTS[1]}]))
    assert {result["label"] for result in ours(TEXTS, top_k=1) for result in result} <= set(LABELS.values())
    alias = pipeline("sentiment-analysis", model=directory, top_k=None)
    assert_same(alias(TEXTS), theirs(TEXTS, top_k=None))


def test_text_classification_needs_a_classifier(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    tf.BertForMaskedLM(bert_config()).save_pretrained(tmp_path)
    bert_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not a sequence classifier"):
        pipeline("text-classification", model=tmp_path)
    with pytest.raises(ValueError, match="unknown option 'max_new_tokens'"):
        pipeline("fill-mask", model=tmp_path, max_new_tokens=3)


def test_fill_mask_on_a_decoder_says_what_it_needs(tmp_path):
    """Was the trainer's "objective 'mlm' is for encoders; a decoder trains as a causal LM or a classifier"."""
    from support import make_checkpoint

    make_checkpoint(tmp_path, family_config("qwen2", num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"is a decoder model; this pipeline needs a BERT masked-LM checkpoint "
                                         r"\(BertForMaskedLM\) \(use pipeline\('text-generation', ...\)"):
        pipeline("fill-mask", model=tmp_path)


def test_a_generating_pipeline_on_an_encoder_says_an_encoder(tmp_path):
    import transformers as tf

    tf.BertForMaskedLM(bert_config()).save_pretrained(tmp_path)
    bert_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="text-generation pipeline cannot run an encoder model; it is an encoder"):
        pipeline("text-generation", model=tmp_path)


@pytest.fixture(scope="module")
def bert_mlm(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(2)
    model = tf.BertForMaskedLM(bert_config())
    with torch.no_grad():
        model.cls.predictions.transform.dense.weight.mul_(20)
    return save(model, tmp_path_factory.mktemp("bert-mlm"), bert_tokenizer())


def test_fill_mask_equals_transformers(bert_mlm):
    ours, theirs = pipeline("fill-mask", model=bert_mlm), hf_pipeline("fill-mask", bert_mlm)
    text = "to be or [MASK] to be"
    assert_same(ours(text), theirs(text))
    assert_same(ours(text, top_k=3), theirs(text, top_k=3))
    assert_same(ours([text, "the quick [MASK] fox"]), theirs([text, "the quick [MASK] fox"]))
    assert_same(ours("the [MASK] brown [MASK]", top_k=2), theirs("the [MASK] brown [MASK]", top_k=2))
    targets = ["fox", "dog", "sea", "question"]
    assert_same(sorted(ours(text, targets=targets), key=lambda r: r["token"]),
                sorted(theirs(text, targets=targets), key=lambda r: r["token"]))
    with pytest.raises(ValueError, match=r"no mask token \(\[MASK\]\)"):
        ours("nothing masked here")


@pytest.fixture(scope="module")
def bert_qa(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(3)
    return save(tf.BertForQuestionAnswering(bert_config()), tmp_path_factory.mktemp("bert-qa"), bert_tokenizer())


def transformers_answers(directory, question, context, top_k=1, max_seq_len=384, doc_stride=128, max_answer_len=15,
                         handle_impossible_answer=False):
    """transformers' extractive QA (the v4 QuestionAnsweringPipeline, removed from transformers 5, whose span
    functions live on in its document-question-answering pipeline): tokenize with overflowing windows, run
    BertForQuestionAnswering, select spans with transformers' own select_starts_ends / decode_spans."""
    import transformers as tf
    from transformers.pipelines.document_question_answering import select_starts_ends

    tokenizer = tf.AutoTokenizer.from_pretrained(directory, model_input_names=BERT_INPUTS)
    model = tf.AutoModelForQuestionAnswering.from_pretrained(directory).eval()
    encoded = tokenizer(text=question, text_pair=context, truncation="only_second", max_length=max_seq_len,
                        stride=doc_stride, return_token_type_ids=True, return_overflowing_tokens=True,
                        return_offsets_mapping=True, return_special_tokens_mask=True)
    answers, min_null_score = [], 1000000
    for span in range(len(encoded["input_ids"])):
        input_ids = encoded["input_ids"][span]
        p_mask = np.array([token != 1 for token in encoded.sequence_ids(span)])
        p_mask[np.array(input_ids) == tokenizer.cls_token_id] = 0
        with torch.no_grad():
            output = model(input_ids=torch.tensor([input_ids]),
                           token_type_ids=torch.tensor([encoded["token_type_ids"][span]]))
        starts, ends, scores, min_null_score = select_starts_ends(
            output.start_logits.numpy(), output.end_logits.numpy(), p_mask, np.array([encoded["attention_mask"][span]]),
            min_null_score, top_k, handle_impossible_answer, max_answer_len)
        encoding = encoded.encodings[span]
        for s, e, score in zip(starts, ends, scores, strict=True):
            try:
                start = encoding.word_to_chars(encoding.token_to_word(s), sequence_index=1)[0]
                end = encoding.word_to_chars(encoding.token_to_word(e), sequence_index=1)[1]
            except Exception:
                start, end = encoding.offsets[s][0], encoding.offsets[e][1]
            answers.append({"score": score.item(), "start": start, "end": end, "answer": context[start:end]})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda answer: answer["score"], reverse=True)[:top_k]
    return answers[0] if len(answers) == 1 else answers


def test_extractive_question_answering_equals_transformers(bert_qa):
    qa = pipeline("question-answering", model=bert_qa)
    assert isinstance(qa, ExtractiveQuestionAnsweringPipeline)
    context = ("Operating systems schedule processes and manage memory with pages. The quick brown fox jumps over "
               "the lazy dog. To be, or not to be, that is the question.")
    question = "what do operating systems manage?"
    assert_same(qa(question=question, context=context), transformers_answers(bert_qa, question, context))
    assert_same(qa({"question": question, "context": context}, top_k=3),
                transformers_answers(bert_qa, question, context, top_k=3))
    assert_same(qa(question=question, context=context, handle_impossible_answer=True, top_k=2),
                transformers_answers(bert_qa, question, context, top_k=2, handle_impossible_answer=True))
    long_context = " ".join([context] * 6)  # several strided windows
    assert_same(qa(question=question, context=long_context, max_seq_len=48, doc_stride=16, top_k=4),
                transformers_answers(bert_qa, question, long_context, top_k=4, max_seq_len=48, doc_stride=16))
    result = qa(question=question, context=context)
    assert context[result["start"]:result["end"]] == result["answer"]
    both = qa(question=[question, "who jumps?"], context=context)
    assert isinstance(both, list) and len(both) == 2


def test_generative_question_answering_stays_for_decoders(chat_checkpoint):
    directory, _ = chat_checkpoint
    assert type(pipeline("question-answering", model=directory)) is QuestionAnsweringPipeline


def test_zero_shot_classification_equals_transformers(tmp_path):
    import transformers as tf

    nli = {0: "contradiction", 1: "neutral", 2: "entailment"}
    torch.manual_seed(4)
    directory = save(tf.BertForSequenceClassification(bert_config(id2label=nli, label2id={v: k for k, v in
                                                                                          nli.items()})),
                     tmp_path, bert_tokenizer())
    ours, theirs = pipeline("zero-shot-classification", model=directory), hf_pipeline("zero-shot-classification",
                                                                                       directory)
    labels = ["fortune", "memory", "dog", "question"]
    assert_same(ours(TEXTS[1], candidate_labels=labels), theirs(TEXTS[1], candidate_labels=labels))
    assert_same(ours(TEXTS, candidate_labels="fortune, dog", multi_label=True),
                theirs(TEXTS, candidate_labels="fortune, dog", multi_label=True))
    assert_same(ours(TEXTS[0], candidate_labels=["sea"], hypothesis_template="It is about {}."),
                theirs(TEXTS[0], candidate_labels=["sea"], hypothesis_template="It is about {}."))
    with pytest.raises(ValueError, match="needs candidate_labels"):
        ours(TEXTS[0])
