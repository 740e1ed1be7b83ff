"""Classification benchmark (issue 18): fine-tuning a random BERT classifier with LLMTrainer against transformers'
Trainer (same checkpoint, data, seed, batch, optimizer; one batch per step, dropout 0 so the runs must agree), and
the text-classification pipeline against transformers' on the trained model.

Measured: training examples per second (median of the steps after the first), the largest difference of the
per-step losses, and pipeline latency for 64 texts (median of 3).

    python benchmarks/classification_throughput.py            # hidden 256, 4 layers, 64-token texts, batch 16
    python benchmarks/classification_throughput.py --tiny     # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import median, print_table, save_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from encoders_support import bert_tokenizer  # noqa: E402  (the tests' WordPiece tokenizer: nothing downloaded)
from support import CORPUS, VOCAB_SIZE  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None)
    options = parser.parse_args()
    import transformers as tf
    from datasets import Dataset

    from llmasos.pipelines import pipeline
    from llmasos.train import LLMTrainer, TrainingArguments

    torch.set_num_threads(2)
    hidden, layers, batch, steps = (32, 2, 8, 4) if options.tiny else (256, 4, 16, options.steps)
    words = CORPUS.split()
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(words) for _ in range(48)), "label": ["neg", "pos"][i % 2]}
            for i in range(batch)]
    directory = Path(tempfile.mkdtemp()) / "bert"
    config = tf.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=128,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(0)
    tf.BertForSequenceClassification(config).save_pretrained(directory)
    bert_tokenizer().save_pretrained(directory)

    class StepTimes(tf.TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    encoded = [dict(tokenizer(row["text"], return_token_type_ids=True), labels=["neg", "pos"].index(row["label"]))
               for row in rows]
    timer = StepTimes()
    hf_args = tf.TrainingArguments(output_dir=str(directory.parent / "hf"), per_device_train_batch_size=batch,
                                   max_steps=steps, learning_rate=1e-3, logging_steps=1, seed=7, report_to=[],
                                   use_cpu=True, save_strategy="no", disable_tqdm=True, optim="adamw_torch")
    hf = tf.Trainer(model=tf.AutoModelForSequenceClassification.from_pretrained(directory), args=hf_args,
                    train_dataset=Dataset.from_list(encoded), data_collator=tf.DataCollatorWithPadding(tokenizer),
                    callbacks=[timer])
    hf.train()
    hf_losses = [entry["loss"] for entry in hf.state.log_history if "loss" in entry]

    ours = LLMTrainer.from_pretrained(directory)
    result = ours.train(rows, args=TrainingArguments(
        output_dir=str(directory.parent / "ours"), objective="classification", per_device_train_batch_size=batch,
        max_steps=steps, learning_rate=1e-3, logging_steps=1, seed=7, save_steps=None, progress_bar=False))
    our_losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    our_step_seconds = result.train_seconds / steps
    ours.save_pretrained(directory.parent / "trained")

    texts = [row["text"] for row in rows] * (64 // batch)
    ours_pipe = pipeline("text-classification", model=directory.parent / "trained")
    hf_pipe = tf.pipeline("text-classification", model=str(directory.parent / "trained"), device="cpu")

    def latency(fn) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn(texts)
            times.append(time.perf_counter() - start)
        return median(times)

    ours_latency, hf_latency = latency(ours_pipe), latency(hf_pipe)
    report = {
        "model": f"BERT hidden {hidden}, {layers} layers, {len(tokenizer(rows[0]['text'])['input_ids'])} tokens a text",
        "batch": batch, "steps": steps,
        "ours_examples_per_second": batch / our_step_seconds,
        "transformers_examples_per_second": batch / median(timer.times[1:] or timer.times),
        "max_loss_difference": max(abs(a - b) for a, b in zip(our_losses, hf_losses, strict=True)),
        "ours_pipeline_seconds_64_texts": ours_latency, "transformers_pipeline_seconds_64_texts": hf_latency,
    }
    print_table("classification fine-tuning and pipeline (CPU, 2 threads)",
                [(key.replace("_", " "), f"{value:.4g}" if isinstance(value, float) else str(value))
                 for key, value in report.items()])
    save_json(options.json, report)
    if options.json is None:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
