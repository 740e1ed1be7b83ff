"""The "embeddings" pipeline (alias "feature-extraction"): sentence embeddings from a BERT-family encoder.

Unlike transformers' feature-extraction (per-token features), the output is one sentence vector per input, pooled and
normalised as the model's sentence-transformers configuration says."""

from __future__ import annotations

from typing import Any

from llmasos.pipelines.base import ENCODER, Pipeline


class EmbeddingsPipeline(Pipeline):
    """`embed(["a sentence", "another"])` -> `[[0.01, ...], [...]]`; a single string gives a list of one vector.

    Options: normalize (None follows the model), batch_size, prompt / prompt_name (the model's prompts),
    return_tensors=True for a float32 tensor (num_inputs, dimension) instead of lists."""

    task = "embeddings"
    kinds = (ENCODER,)
    task_options = frozenset({"normalize", "batch_size", "prompt", "prompt_name", "return_tensors"})

    def __call__(self, inputs: str | list[str], **options: Any):
        options = self.merged(options)
        return_tensors = options.pop("return_tensors", False)
        vectors = self.model.encode(inputs, **options)
        return vectors if return_tensors else vectors.tolist()

    @property
    def dimension(self) -> int:
        return self.model.dimension
