"""`llmasos train` (fine-tune a model, or pretrain one from a config, optionally from a YAML recipe) and
`llmasos tokenizer train` (byte-level BPE). Runs as one process or under `torchrun --nproc_per_node N`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

# Recipe keys besides `training:` (TrainingArguments fields) and what they mean; CLI options override them.
RECIPE_KEYS = ("model", "model_config", "tokenizer", "data", "eval_data", "eval_split", "output", "batch_size",
               "save_dtype", "training", "init_seed")


def _read_recipe(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        from llmasos.errors import yaml_problem

        raise ValueError(f"{path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} must hold a mapping of recipe keys ({', '.join(RECIPE_KEYS)})")
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown recipe key(s) {', '.join(unknown)}; known: {', '.join(RECIPE_KEYS)}")
    if not isinstance(recipe.get("training", {}), dict):
        raise ValueError(f"{path}: 'training' must be a mapping of training arguments")
    return recipe


def _load_tokenizer(spec: Any, output: Path, train_records: list, ctx) -> Any:
    """`tokenizer:` is a directory, or {train: {vocab_size: N, ...}} to train one on the training data (saved in
    OUTPUT/tokenizer and reused when the run is resumed; `wordpiece: true` for a BERT vocabulary)."""
    from llmasos.tokenizer import Tokenizer
    from llmasos.train.data import texts_of
    from llmasos.train.distributed import barrier
    from llmasos.train.tokenizer_trainer import train_tokenizer

    if isinstance(spec, (str, Path)):
        return Tokenizer.from_dir(Path(spec))
    if not isinstance(spec, dict) or not isinstance(spec.get("train"), dict):
        raise ValueError("tokenizer must be a directory or {train: {vocab_size: N, ...}} to train one")
    directory = output / "tokenizer"
    if ctx.is_main and not (directory / "tokenizer.json").is_file():
        options = dict(spec["train"])
        vocab_size = options.pop("vocab_size", None)
        if not isinstance(vocab_size, int):
            raise ValueError("tokenizer.train needs an integer vocab_size")
        if options.pop("wordpiece", False):  # BERT's vocabulary, for --objective mlm
            from llmasos.train.tokenizer_trainer import train_wordpiece_tokenizer

            train_wordpiece_tokenizer(texts_of(train_records), vocab_size, **options).save(directory)
        else:
            train_tokenizer(texts_of(train_records), vocab_size, **options).save(directory)
    barrier(ctx)
    return Tokenizer.from_dir(directory)


@click.command()
@click.option("--model", "-m", default=None, help="Library name or checkpoint directory to fine-tune.")
@click.option("--model-config", default=None, type=click.Path(path_type=Path),
              help="Pretrain from scratch: a config.json (or directory holding one); needs --tokenizer.")
@click.option("--tokenizer", default=None, type=click.Path(path_type=Path),
              help="Tokenizer directory (tokenizer.json) for --model-config; see `llmasos tokenizer train`.")
@click.option("--data", default=None, help="Training data: .txt, .jsonl or .json.")
@click.option("--eval-data", default=None, help="Evaluation data (same formats).")
@click.option("--eval-split", default=None, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Hold out the last FRACTION of --data for evaluation instead.")
@click.option("--output", "-o", default=None, type=click.Path(path_type=Path),
              help="Run directory: checkpoints, metrics.jsonl, and the final model in OUTPUT/final.")
@click.option("--method", type=click.Choice(["full", "lora"]), default=None, help="Full fine-tuning or LoRA.")
@click.option("--task", "--objective", "objective", type=click.Choice(["causal", "mlm", "classification"]),
              default=None, help="What to learn: causal (next token; decoders), mlm (masked LM; BERT) or "
                                 "classification (data of {text, [text_pair], label}).  [default: causal]")
@click.option("--mlm-probability", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Share of tokens masked by --objective mlm.  [default: 0.15]")
@click.option("--mlm-whole-word", is_flag=True, default=None,
              help="--objective mlm masks whole words (every piece of a chosen word, all as [MASK]).")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), default=None, help="Passes over the data.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Global batch per optimizer step, split across processes.  [default: 8]")
@click.option("--gradient-accumulation-steps", type=click.IntRange(1), default=None)
@click.option("--learning-rate", type=float, default=None)
@click.option("--max-seq-length", type=click.IntRange(2), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--save-steps", type=click.IntRange(1), default=None)
@click.option("--bf16/--no-bf16", default=None, help="bfloat16 autocast.")
@click.option("--fsdp", is_flag=True, default=None, help="Shard the model across processes (FSDP) instead of DDP.")
@click.option("--device", default=None, help="auto, cpu or cuda.  [default: auto]")
@click.option("--resume", default=None, type=click.Path(path_type=Path),
              help="Resume from a checkpoint directory or a run directory (its latest checkpoint).")
@click.option("--config", "recipe_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A YAML recipe; options given here override it.")
def train(model, model_config, tokenizer, data, eval_data, eval_split, output, method, objective, mlm_probability,
          mlm_whole_word, max_steps, epochs, batch_size,
          gradient_accumulation_steps, learning_rate, max_seq_length, seed, save_steps, bf16, fsdp, device, resume,
          recipe_path) -> None:
    """Train a model and write a loadable checkpoint to OUTPUT/final."""
    import time
    import warnings

    from llmasos.train import LLMTrainer, TrainingArguments
    from llmasos.train.data import hold_out, read_records
    from llmasos.train.distributed import setup, teardown

    recipe = _read_recipe(recipe_path)
    model = model or recipe.get("model")
    model_config = model_config or recipe.get("model_config")
    data = data or recipe.get("data")
    eval_data = eval_data or recipe.get("eval_data")
    eval_split = eval_split or recipe.get("eval_split")
    output = Path(output or recipe.get("output") or "")
    if not data:
        raise click.UsageError("give --data (or `data:` in the --config recipe)")
    if not str(output) or str(output) == ".":
        raise click.UsageError("give --output DIR (or `output:` in the --config recipe)")
    if bool(model) == bool(model_config):
        raise click.UsageError("give exactly one of --model (fine-tune) or --model-config (pretrain from scratch)")
    if eval_data and eval_split:
        raise click.UsageError("give --eval-data or --eval-split, not both")

    training = dict(recipe.get("training", {}))
    overrides = {"method": method, "objective": objective, "mlm_probability": mlm_probability,
                 "mlm_whole_word": mlm_whole_word,
                 "max_steps": max_steps, "num_train_epochs": epochs, "learning_rate": learning_rate,
                 "gradient_accumulation_steps": gradient_accumulation_steps, "max_seq_length": max_seq_length,
                 "seed": seed, "save_steps": save_steps, "bf16": bf16, "fsdp": fsdp, "device": device}
    training.update({key: value for key, value in overrides.items() if value is not None})
    training["output_dir"] = str(output)
    ctx = setup(training.get("device", "auto"))
    try:
        global_batch = batch_size or recipe.get("batch_size") or 8
        accumulation = training.get("gradient_accumulation_steps", 1)
        if global_batch % (ctx.world_size * accumulation):
            raise click.UsageError(f"--batch-size {global_batch} must be divisible by the number of processes "
                                   f"({ctx.world_size}) times gradient_accumulation_steps ({accumulation})")
        training["per_device_train_batch_size"] = global_batch // (ctx.world_size * accumulation)
        args = TrainingArguments.from_dict(training)

        from llmasos.train.labels import read_labelled

        reader = read_labelled if args.objective == "classification" else read_records
        train_records = reader(data)
        eval_records = reader(eval_data, "eval_data") if eval_data else None
        if eval_split:
            train_records, eval_records = hold_out(train_records, eval_split)
        if model:
            trainer = LLMTrainer.from_pretrained(model)
        else:
            spec = tokenizer or recipe.get("tokenizer")
            if spec is None:
                raise click.UsageError("--model-config needs --tokenizer DIR (or `tokenizer:` in the recipe)")
            tok = _load_tokenizer(spec, output, train_records, ctx)
            config = model_config if isinstance(model_config, dict) else Path(model_config)
            trainer = LLMTrainer.from_config(config, tok, seed=recipe.get("init_seed", args.seed))
        started = time.perf_counter()
        with warnings.catch_warnings():  # the summary below reports skipped examples
            warnings.filterwarnings("ignore", message="train_data: skipped")
            result = trainer.train(train_records, eval_records, args, resume_from_checkpoint=resume)
        final = output / "final"
        trainer.save_pretrained(final, merge=True, dtype=recipe.get("save_dtype"))
        if args.method == "lora":
            trainer.save_pretrained(output / "adapter")
        if ctx.is_main:
            _summary(result, final, time.perf_counter() - started, trainer, eval_records, args)
    finally:
        teardown(ctx)


def _summary(result, final: Path, seconds: float, trainer=None, eval_records=None, args=None) -> None:
    steps = f"{result.global_step:,} step{'s' * (result.global_step != 1)}"
    lines = [f"trained {result.parameters_text()} for {steps} in {seconds:.1f}s "
             f"({result.num_train_tokens:,} tokens)"]
    if result.train_loss is not None:
        lines.append(f"final train loss {result.train_loss:.4f}")
    if result.eval_loss is not None and args is not None and args.objective == "classification":
        from llmasos.classification import SequenceClassifier
        from llmasos.eval.classification import evaluate_classification

        scores = evaluate_classification(SequenceClassifier.load(final), eval_records)
        lines.append(f"eval loss {result.eval_loss:.4f}, accuracy {scores.accuracy:.4f}, "
                     f"macro-F1 {scores.macro_f1:.4f}")
    elif result.eval_loss is not None:
        lines.append(f"eval loss {result.eval_loss:.4f}, perplexity {result.eval_perplexity:.2f}")
    if result.skipped:
        lines.append("skipped: " + "; ".join(f"{len(v)} {k} (first: {v[0]})" for k, v in result.skipped.items()))
    lines.append(f"model saved to {final}")
    click.echo("\n".join(lines))


@click.group("tokenizer")
def tokenizer_group() -> None:
    """Tokenizer tools."""


@tokenizer_group.command("train")
@click.option("--data", "data", multiple=True, required=True, help="Text to learn from (.txt, .jsonl, .json); repeat.")
@click.option("--vocab-size", type=click.IntRange(6), required=True, help="Ids in the vocabulary, specials included.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--min-frequency", type=click.IntRange(1), default=2, show_default=True)
@click.option("--special-tokens", default=None,
              help="Comma-separated special tokens, the end-of-text token first.  "
                   "[default: <|endoftext|>,<|pad|>,<|system|>,<|user|>,<|assistant|>,<|end|>]")
@click.option("--no-chat-template", is_flag=True, help="Save without the default chat template.")
@click.option("--wordpiece", is_flag=True,
              help="A BERT WordPiece vocabulary ([PAD] [UNK] [CLS] [SEP] [MASK], lower-cased) for encoders.")
def tokenizer_train(data: tuple[str, ...], vocab_size: int, output: Path, min_frequency: int,
                    special_tokens: str | None, no_chat_template: bool, wordpiece: bool) -> None:
    """Train a byte-level BPE tokenizer (or with --wordpiece a BERT WordPiece one) and save tokenizer.json +
    tokenizer_config.json to OUTPUT."""
    from llmasos.train.tokenizer_trainer import train_tokenizer_from_files

    options: dict[str, Any] = {"min_frequency": min_frequency}
    if wordpiece:
        if special_tokens or no_chat_template:
            raise click.UsageError("--wordpiece has BERT's special tokens and no chat template")
        tokenizer = train_tokenizer_from_files(list(data), vocab_size, output, wordpiece=True, **options)
        click.echo(f"trained a WordPiece tokenizer of {tokenizer.vocab_size:,} tokens; saved to {output}")
        return
    if special_tokens:
        options["special_tokens"] = [token.strip() for token in special_tokens.split(",") if token.strip()]
    if no_chat_template:
        options["chat_template"] = None
    tokenizer = train_tokenizer_from_files(list(data), vocab_size, output, **options)
    click.echo(f"trained a byte-level BPE tokenizer of {tokenizer.vocab_size:,} tokens; saved to {output}")


def register(cli: click.Group) -> None:
    cli.add_command(train)
    existing = cli.commands.get("tokenizer")
    if isinstance(existing, click.Group):
        existing.add_command(tokenizer_train)
    else:
        cli.add_command(tokenizer_group)
