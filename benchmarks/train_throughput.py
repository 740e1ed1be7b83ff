"""Training throughput of LLMTrainer against transformers' Trainer on the same model, data and batch, in one run.

Reports tokens/s and MFU (model FLOPs utilisation: 6 * parameters + attention FLOPs per token, against a matrix
product peak measured on this machine, in the training dtype). transformers is a benchmark-only dependency.

    python benchmarks/train_throughput.py                       # CPU, float32, a ~20M-parameter Llama
    python benchmarks/train_throughput.py --device cuda --bf16 --hidden 1024 --layers 8 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Best-case dense matmul rate of this device: the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(config: dict, seq_len: int) -> float:
    """6 N (forward + backward of every weight, the output head included) + 12 L H T for attention scores."""
    hidden, layers, inter, vocab = (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
                                    config["vocab_size"])
    per_layer = 4 * hidden * hidden + 3 * hidden * inter  # q, k, v, o (full heads) + gated MLP
    return 6 * (layers * per_layer + hidden * vocab) + 12 * layers * hidden * seq_len


def make_checkpoint(directory: Path, args: argparse.Namespace) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llmasos.train.tokenizer_trainer import train_tokenizer

    corpus = [f"benchmark text number {i}: the quick brown fox jumps over the lazy dog." for i in range(2000)]
    tokenizer = train_tokenizer(corpus, 512, chat_template=None)
    tokenizer.save(directory)
    intermediate = args.hidden * 8 // 3 // 64 * 64
    config = dict(vocab_size=args.vocab_size, hidden_size=args.hidden, intermediate_size=intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                  num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq_len,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))  # loads: the files are valid
    return config


def run_ours(directory: Path, blocks: list[list[int]], args: argparse.Namespace, output: Path) -> float:
    from llmasos import LLMTrainer, TrainingArguments

    trainer = LLMTrainer.from_pretrained(directory)
    training = TrainingArguments(output_dir=str(output), max_steps=args.warmup + args.steps,
                                 per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
                                 max_seq_length=args.seq_len, save_steps=None, logging_steps=1, bf16=args.bf16,
                                 device=args.device, progress_bar=False, lr_scheduler_type="constant")
    result = trainer.train([{"input_ids": block} for block in blocks], args=training)
    timed = [r for r in result.log_history if "loss" in r][args.warmup:]
    tokens = args.batch_size * args.seq_len * len(timed)
    seconds = sum(args.batch_size * args.seq_len / r["tokens_per_second"] for r in timed)
    return tokens / seconds


def run_transformers(directory: Path, blocks: list[list[int]], args: argparse.Namespace, output: Path) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    dataset = [{"input_ids": block, "labels": block} for block in blocks]
    step_times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            _sync(torch.device(args.device))
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            _sync(torch.device(args.device))
            step_times.append(time.perf_counter() - self.start)

    training = transformers.TrainingArguments(
        output_dir=str(output), max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=10_000, save_strategy="no",
        report_to=[], bf16=args.bf16, use_cpu=args.device == "cpu", dataloader_num_workers=0, disable_tqdm=True,
        max_grad_norm=1.0, seed=0, remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=dataset,
                                   data_collator=transformers.default_data_collator, callbacks=[Timer()])
    trainer.train()
    timed = step_times[args.warmup:]
    return args.batch_size * args.seq_len * len(timed) / sum(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast in both trainers")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix size of the peak measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        config = make_checkpoint(directory, args)
        generator = torch.Generator().manual_seed(0)
        count = args.batch_size * (args.warmup + args.steps)
        blocks = torch.randint(1, args.vocab_size, (count, args.seq_len), generator=generator).tolist()
        peak = measure_peak_tflops(device, dtype, args.peak_size)
        results = {}
        for name, runner in (("llmasos", run_ours), ("transformers", run_transformers)):
            results[name] = runner(directory, blocks, args, Path(tmp) / name)
    per_token = flops_per_token(config, args.seq_len)
    report = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "config": config,
              "batch": [args.batch_size, args.seq_len], "timed_steps": args.steps, "peak_tflops": round(peak, 2),
              "flops_per_token": per_token, "results": {
                  name: {"tokens_per_second": round(tps, 1), "mfu": round(tps * per_token / (peak * 1e12), 4)}
                  for name, tps in results.items()}}
    if args.json:
        print(json.dumps(report))
        return
    print(f"device {report['device']} ({report['dtype']}), measured matmul peak {peak:.2f} TFLOP/s")
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab_size}; "
          f"batch {args.batch_size} x {args.seq_len} tokens; {args.steps} timed steps after {args.warmup} warm-up")
    for name, values in report["results"].items():
        print(f"  {name:13s} {values['tokens_per_second']:>12,.0f} tokens/s   MFU {values['mfu']:.1%}")


if __name__ == "__main__":
    main()
