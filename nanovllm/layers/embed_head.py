import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.loader import check_shape
from nanovllm.utils.parallel import tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split across tensor-parallel ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_rank
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor):
        check_shape(loaded_weight, (self.num_embeddings, param.size(1)))
        shard = loaded_weight[self.vocab_start:self.vocab_start + self.num_embeddings_per_rank]
        param.data[:shard.size(0)].copy_(shard)
        param.data[shard.size(0):].zero_()  # the last rank's padding rows past the vocabulary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(x, self.weight)
        local = x - self.vocab_start
        in_shard = (local >= 0) & (local < self.num_embeddings_per_rank)
        y = F.embedding(local * in_shard, self.weight) * in_shard.unsqueeze(-1)
        dist.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection; with several ranks the full logits are gathered on rank 0 only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        logits = F.linear(x, self.weight)
        if self.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
        dist.gather(logits, parts, 0)
        return torch.cat(parts, -1)[:, :self.num_embeddings] if self.tp_rank == 0 else None
