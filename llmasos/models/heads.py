"""Task models on our backbones, under transformers' parameter names so checkpoints go both ways unrenamed:
BERT's sequence classifier (pooler + classifier), masked-LM head and extractive-QA head, RoBERTa's (and XLM-R's,
CamemBERT's) classifier (classifier.dense + out_proj, no pooler) and QA head, and the decoder families'
sequence classifier (the score of the last non-pad token, `score.weight`, as LlamaForSequenceClassification).

`load_task_model` reads any of them from a checkpoint directory; `attach_head` puts a head on an already loaded
backbone (a trainer's model), filling what the checkpoint holds and initialising the rest as transformers does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from llmasos.errors import ModelLoadError
from llmasos.models.attention import AttentionMetadata
from llmasos.models.base import CausalLM
from llmasos.models.bert import ENCODER_FAMILIES, BertConfig, BertModel, BertPooler
from llmasos.models.layers import activation

CLASSIFICATION, MASKED_LM, QUESTION_ANSWERING = "classification", "mlm", "question-answering"
# transformers' class names, for config.json's `architectures` (what AutoModelFor... reads).
DECODER_CLASSIFIERS = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
                       "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification"}
ENCODER_ARCHITECTURES = {CLASSIFICATION: "ForSequenceClassification", MASKED_LM: "ForMaskedLM",
                         QUESTION_ANSWERING: "ForQuestionAnswering"}
ENCODER_CLASS_PREFIXES = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert"}
# The attribute (and checkpoint prefix) transformers' task models keep the encoder under.
ENCODER_ATTRIBUTES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta"}


def encoder_architecture(model_type: str, task: str) -> str:
    """e.g. ("roberta", "classification") -> "RobertaForSequenceClassification"."""
    return ENCODER_CLASS_PREFIXES[model_type] + ENCODER_ARCHITECTURES[task]


class TaskModel(nn.Module):
    """What the trainer needs of a task model besides forward: its config, its layers (for FSDP / LoRA targets),
    the head (trained in full under LoRA, never wrapped) and the names of the head's modules."""

    head_modules: tuple[str, ...] = ()
    task = ""

    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def output_embeddings(self) -> nn.Module:
        return getattr(self, self.head_modules[0])

    def tie_weights(self) -> None:
        pass


class BertTaskModel(TaskModel):
    """An encoder (kept as `bert` or `roberta`, transformers' attribute for the family) with a task head."""

    families: tuple[str, ...] = ("bert",)

    def __init__(self, config: BertConfig, backbone: BertModel | None = None) -> None:
        super().__init__()
        if config.model_type not in self.families:
            raise ModelLoadError(f"the {self.task} head is implemented for {', '.join(self.families)} checkpoints, "
                                 f"not {config.model_type!r}")
        self.config = config
        self.prefix = ENCODER_ATTRIBUTES[config.model_type]
        self.add_module(self.prefix, backbone if backbone is not None else ENCODER_FAMILIES[config.model_type](config))

    @property
    def encoder_model(self) -> BertModel:
        return getattr(self, self.prefix)

    def decoder_layers(self) -> nn.ModuleList:
        return self.encoder_model.encoder.layer

    @property
    def gradient_checkpointing(self) -> bool:
        return False

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        if value:
            raise ValueError("gradient_checkpointing is implemented for decoder models only")


class BertForSequenceClassification(BertTaskModel):
    """pooler(hidden of [CLS]) -> dropout -> classifier: logits (batch, num_labels)."""

    head_modules = ("classifier",)
    task = CLASSIFICATION

    def __init__(self, config: BertConfig, num_labels: int, backbone: BertModel | None = None) -> None:
        super().__init__(config, backbone)
        self.num_labels = num_labels
        self.bert.pooler = BertPooler(config)
        dropout = config.raw.get("classifier_dropout")
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask, token_type_ids)  # (batch, length, hidden)
        return self.classifier(self.dropout(self.bert.pooler(hidden))).float()  # (batch, num_labels)


class RobertaClassificationHead(nn.Module):
    def __init__(self, config: BertConfig, num_labels: int) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        dropout = config.raw.get("classifier_dropout")
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.out_proj = nn.Linear(config.hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        first = self.dropout(hidden[:, 0])  # the <s> token
        return self.out_proj(self.dropout(torch.tanh(self.dense(first))))


class RobertaForSequenceClassification(BertTaskModel):
    """RoBERTa, XLM-RoBERTa, CamemBERT: dense + tanh + out_proj on the first token (no pooler)."""

    head_modules = ("classifier",)
    task = CLASSIFICATION
    families = ("roberta", "xlm-roberta", "camembert")

    def __init__(self, config: BertConfig, num_labels: int, backbone: BertModel | None = None) -> None:
        super().__init__(config, backbone)
        self.num_labels = num_labels
        self.classifier = RobertaClassificationHead(config, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.roberta(input_ids, attention_mask, token_type_ids)).float()


class BertForMaskedLM(BertTaskModel):
    """transform (dense, activation, LayerNorm) -> decoder tied to the word embeddings, plus a bias."""

    head_modules = ("cls",)
    task = MASKED_LM

    def __init__(self, config: BertConfig, backbone: BertModel | None = None) -> None:
        super().__init__(config, backbone)
        self.cls = nn.Module()
        self.cls.predictions = nn.Module()
        predictions = self.cls.predictions
        predictions.transform = nn.Module()
        predictions.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        predictions.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        predictions.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        predictions.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.act = activation(config.hidden_act)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.raw.get("tie_word_embeddings", True):
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    @property
    def tied(self) -> bool:
        return self.cls.predictions.decoder.weight is self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert(input_ids, attention_mask, token_type_ids)  # (batch, length, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., hidden) -> logits (..., vocab) in float32."""
        transform = self.cls.predictions.transform
        hidden = transform.LayerNorm(self.act(transform.dense(hidden)))
        return (self.cls.predictions.decoder(hidden) + self.cls.predictions.bias).float()


class BertForQuestionAnswering(BertTaskModel):
    """qa_outputs: start and end logits of every token, (batch, length) each."""

    head_modules = ("qa_outputs",)
    task = QUESTION_ANSWERING
    families = ("bert", "roberta", "xlm-roberta", "camembert")

    def __init__(self, config: BertConfig, backbone: BertModel | None = None) -> None:
        super().__init__(config, backbone)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder_model(input_ids, attention_mask, token_type_ids)
        logits = self.qa_outputs(hidden).float()  # (batch, length, 2)
        return logits[..., 0], logits[..., 1]


class DecoderForSequenceClassification(TaskModel):
    """A decoder family's layers, then `score` on the last token that is not padding (transformers' rule: the
    rightmost position whose id differs from pad_token_id; the last position when the config has no pad id)."""

    head_modules = ("score",)
    task = CLASSIFICATION

    def __init__(self, causal: CausalLM, num_labels: int) -> None:
        super().__init__()
        if causal.config.model_type not in DECODER_CLASSIFIERS:
            raise ModelLoadError(f"sequence classification is implemented for {', '.join(DECODER_CLASSIFIERS)} "
                                 f"decoders, not {causal.config.model_type!r}")
        self.config = causal.config
        self.num_labels = num_labels
        for name, child in causal.named_children():  # the backbone's modules under their own names (model.*)
            if name != "lm_head":
                self.add_module(name, child)
        self.score = nn.Linear(causal.config.hidden_size, num_labels, bias=False)
        if hasattr(causal, "lm_head"):
            del causal.lm_head  # the vocabulary head is not part of a classifier
        self._causal = (causal,)  # a tuple: its methods are used, its modules are already registered above

    @property
    def causal(self) -> CausalLM:
        return self._causal[0]

    @property
    def gradient_checkpointing(self) -> bool:
        return self.causal.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.causal.gradient_checkpointing = value

    def decoder_layers(self) -> nn.ModuleList:
        return self.causal.decoder_layers()

    def train(self, mode: bool = True) -> DecoderForSequenceClassification:
        super().train(mode)
        self.causal.training = mode
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (batch, length), padded at the end -> logits (batch, num_labels)."""
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).repeat(batch)
        hidden = self.causal(input_ids.reshape(-1), positions, AttentionMetadata.for_prompts([length] * batch))
        hidden = hidden.view(batch, length, -1)
        pad_id = self.config.raw.get("pad_token_id")
        if pad_id is None:
            if batch != 1:
                raise ValueError("the model config has no pad_token_id, so a batch of several texts cannot be "
                                 "classified; set pad_token_id in config.json")
            last = torch.full((batch,), length - 1, device=input_ids.device)
        else:
            indices = torch.arange(length, device=input_ids.device)
            last = (indices * (input_ids != pad_id).int()).argmax(-1)  # (batch,)
        pooled = hidden[torch.arange(batch, device=input_ids.device), last]  # (batch, hidden)
        return self.score(pooled).float()


# -- loading -------------------------------------------------------------------------------------------------------
def checkpoint_tensors(directory: Path) -> dict[str, tuple[Path, list[int]]]:
    """Every tensor name of a checkpoint's safetensors -> (file, shape)."""
    from llmasos.models.loader import check_safetensors, weight_files

    table: dict[str, tuple[Path, list[int]]] = {}
    for file in weight_files(directory):
        for name, info in check_safetensors(file).items():
            table[name] = (file, list(info["shape"]))
    return table


@torch.no_grad()
def init_new(module: nn.Module, std: float) -> None:
    """transformers' _init_weights for a fresh head: normal(0, std) weights, zero biases, unit LayerNorms."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


@torch.no_grad()
def fill_from_checkpoint(model: nn.Module, directory: Path, prefixes: tuple[str, ...] = ()) -> list[str]:
    """Copy the checkpoint tensors whose names (or, for a bare backbone checkpoint, prefix + name) match a parameter
    of `model` with the same shape. Returns the parameters the checkpoint does not hold (or holds in another shape,
    as a head for another number of labels)."""
    table = checkpoint_tensors(directory)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for source, (file, shape) in table.items():
        for prefix in ("", *prefixes):
            target = prefix + source
            if target in params and list(params[target].shape) == shape and target not in loaded:
                by_file.setdefault(file, []).append((source, target))
                loaded.add(target)
                break
    for file, pairs in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for source, target in pairs:
                params[target].copy_(handle.get_tensor(source))
    if isinstance(model, BertForMaskedLM) and model.tied:
        loaded.add("cls.predictions.decoder.weight")
    return sorted(set(params) - loaded)


def attach_head(backbone: nn.Module, task: str, directory: Path | None, num_labels: int | None = None,
                seed: int = 0) -> tuple[TaskModel, list[str]]:
    """Wrap a loaded backbone (BertModel or CausalLM) in the task model; the head's weights come from `directory`
    when it holds them in the right shape, else are initialised (seeded). Returns (model, names initialised)."""
    std = float(backbone.config.raw.get("initializer_range", 0.02))
    dtype = next(backbone.parameters()).dtype
    torch.manual_seed(seed)
    if isinstance(backbone, CausalLM):
        if task != CLASSIFICATION:
            raise ValueError(f"objective {task!r} is for encoders; a decoder trains as a causal LM or a classifier")
        model: TaskModel = DecoderForSequenceClassification(backbone, num_labels or 2)
    elif task == CLASSIFICATION:
        classifier = BertForSequenceClassification if backbone.config.model_type == "bert" else \
            RobertaForSequenceClassification
        model = classifier(backbone.config, num_labels or 2, backbone)
    elif task == MASKED_LM:
        model = BertForMaskedLM(backbone.config, backbone)
    elif task == QUESTION_ANSWERING:
        model = BertForQuestionAnswering(backbone.config, backbone)
    else:
        raise ValueError(f"unknown task {task!r}")
    prefix = f"{model.prefix}." if isinstance(model, BertTaskModel) else ""
    backbone_names = {f"{prefix}{name}" for name, _ in backbone.named_parameters()}
    head = [module for name, module in model.named_children() if f"{name}." != prefix and name not in
            {n for n, _ in backbone.named_children()}]
    if isinstance(model, BertTaskModel) and hasattr(model.encoder_model, "pooler"):
        head.append(model.encoder_model.pooler)
    for module in head:
        init_new(module, std)
    if isinstance(model, BertForMaskedLM):
        nn.init.zeros_(model.cls.predictions.bias)
        model.tie_weights()
    model.to(dtype)
    missing = fill_from_checkpoint(model, directory, (prefix,) if prefix else ()) if directory is not None else [
        name for name, _ in model.named_parameters()]
    return model, [name for name in missing if name not in backbone_names]


def load_backbone(path: str | Path, dtype: str | torch.dtype = "float32") -> nn.Module:
    """The backbone of any checkpoint of a supported family, task heads ignored: a BertModel for encoders, a CausalLM
    for decoders (a classifier checkpoint has no lm_head: it is initialised, and unused)."""
    from llmasos.models import load_config, model_class
    from llmasos.models.bert import load_encoder
    from llmasos.models.loader import read_config_json, resolve_directory

    directory = resolve_directory(path)
    data = read_config_json(directory)
    if data.get("model_type") in ENCODER_FAMILIES:
        return load_encoder(directory, dtype, "cpu")[0]
    config = load_config(data)
    model = model_class(config)(config)
    model.tie_weights()
    model.to(dtype if isinstance(dtype, torch.dtype) else getattr(torch, "float32" if dtype == "auto" else dtype))
    missing = [name for name in fill_from_checkpoint(model, directory) if name != "lm_head.weight"]
    if missing:
        raise ModelLoadError(f"checkpoint is missing weights: {', '.join(missing[:5])}")
    return model.eval()


def load_task_model(path: str | Path, task: str, dtype: str | torch.dtype = "float32",
                    device: str | torch.device = "cpu") -> tuple[TaskModel, dict[str, Any]]:
    """A complete task checkpoint (every head weight present) in eval mode, and its config.json dict."""
    from llmasos.models.loader import read_config_json, resolve_directory

    directory = resolve_directory(path)
    data = read_config_json(directory)
    num_labels = len(data.get("id2label") or {}) or data.get("num_labels") or 2
    with torch.random.fork_rng(devices=[]):  # loading leaves the caller's random state alone
        model, missing = attach_head(load_backbone(directory, dtype), task, directory, num_labels)
    if missing:
        raise ModelLoadError(f"{directory} has no {task} head (missing {', '.join(missing[:3])}): it is not a "
                             f"*{ENCODER_ARCHITECTURES.get(task, task)} checkpoint")
    return model.to(device).eval(), data
