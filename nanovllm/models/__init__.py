"""Model families, by the model_type of a checkpoint's config.json.

A family's model class is built from the checkpoint's config (`cls(hf_config)`, under the runner's
device and dtype) and implements DecoderModel. The runner needs `forward` and `compute_logits`; the
attention/FFN pipeline splits a decode step along the other methods, so that the halves of one layer
can run for different micro-batches on different SMs. Weights load by Hugging Face tensor names, with
`packed_modules_mapping` routing separate checkpoint tensors into one packed parameter.
"""
import importlib
from typing import Protocol

import torch

# model_type -> (module, class)
MODEL_TYPES = {"qwen3": ("nanovllm.models.qwen3", "Qwen3ForCausalLM")}


class DecoderModel(Protocol):
    # checkpoint tensor name -> (packed parameter, shard id)
    packed_modules_mapping: dict[str, tuple[str, object]]

    @property
    def num_layers(self) -> int: ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states after the final norm; attention reads the forward context (utils/context.py)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of the given rows (None on tensor-parallel ranks > 0)."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def forward_attention(self, layer: int, positions: torch.Tensor, hidden: torch.Tensor,
                          residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s input norm (adding the residual) and attention: (attention output, residual)."""

    def forward_ffn(self, layer: int, hidden: torch.Tensor,
                    residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s post-attention norm (adding the residual) and MLP: (MLP output, residual)."""

    def norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The final norm of the last layer's output and residual."""


def model_class(model_type: str) -> type[DecoderModel]:
    module, name = MODEL_TYPES[model_type]
    return getattr(importlib.import_module(module), name)
