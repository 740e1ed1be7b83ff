"""Model families by Hugging Face `model_type`: adding a family is one file plus one line here."""

from __future__ import annotations

from llmasos.errors import ModelLoadError
from llmasos.models.base import CausalLM
from llmasos.models.config import ModelConfig
from llmasos.models.gemma2 import Gemma2ForCausalLM
from llmasos.models.gpt2 import GPT2LMHeadModel
from llmasos.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from llmasos.models.phi3 import Phi3ForCausalLM

MODEL_FAMILIES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "phi3": Phi3ForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "gpt2": GPT2LMHeadModel,
}

# Config defaults that differ from ModelConfig's when a config.json leaves the key out (as transformers' classes do).
FAMILY_DEFAULTS: dict[str, dict] = {
    "gemma2": {"tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh"},
    "gpt2": {"tie_word_embeddings": True, "hidden_act": "gelu_new"},
}


def model_class(config: ModelConfig) -> type[CausalLM]:
    try:
        return MODEL_FAMILIES[config.model_type]
    except KeyError:
        raise ModelLoadError(
            f"model_type {config.model_type!r} is not supported; supported families: "
            f"{', '.join(sorted(MODEL_FAMILIES))}") from None


def load_config(data: dict) -> ModelConfig:
    """A ModelConfig from a config.json dict, with the family's defaults for keys the file leaves out."""
    defaults = FAMILY_DEFAULTS.get(data.get("model_type", ""), {})
    present = {k: v for k, v in data.items() if v is not None or k not in defaults}
    config = ModelConfig.from_dict({**defaults, **present})
    model_class(config)
    return config


__all__ = ["CausalLM", "ModelConfig", "MODEL_FAMILIES", "model_class", "load_config"]
