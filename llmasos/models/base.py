"""CausalLM: what every model family provides to the runtime, the engine and the trainer."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmasos.models.attention import AttentionMetadata
from llmasos.models.config import ModelConfig


class CausalLM(nn.Module):
    """A decoder-only language model over a flat batch of tokens.

    Subclasses build their modules under Hugging Face's parameter names and implement `embed`, `layers_forward`
    inputs via `decoder_layers`, and `final_norm`; weights then load from safetensors with no renaming."""

    # Checkpoint tensors that carry no weights (old buffers); the loader skips them.
    ignored_weight_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False

    # -- to implement -------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def position_inputs(self, positions: torch.Tensor, attn: AttentionMetadata) -> tuple:
        """Extra per-step inputs every layer needs (the rotary cos/sin); none by default."""
        return ()

    @classmethod
    def sanitize(cls, weights: dict[str, str]) -> dict[str, str]:
        """Map checkpoint tensor names to parameter names where a family's checkpoints vary; identity by default."""
        return weights

    # -- shared -------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """input_ids and positions (num_tokens,) -> final hidden states (num_tokens, hidden)."""
        hidden = self.embed(input_ids, positions)
        extra = self.position_inputs(positions, attn)
        for layer in self.decoder_layers():
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(layer, hidden, *extra, attn, use_reentrant=False)
            else:
                hidden = layer(hidden, *extra, attn)
        return self.final_norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (num_tokens, hidden) -> logits (num_tokens, vocab) in float32."""
        logits = self.output_embeddings()(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.output_embeddings().weight = self.input_embeddings().weight

    def input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def num_parameters(self) -> int:
        """Every parameter of the model, counted once (tied weights); a quantized layer counts the weights it stands
        for, as in the float checkpoint (its packed tensors are buffers)."""
        unique = {id(p): p for p in self.parameters()}.values()
        quantized = (m.num_weights() for m in self.modules() if callable(getattr(m, "num_weights", None)))
        return sum(p.numel() for p in unique) + sum(quantized)
