"""The least time a run could take on a device: the bytes and FLOPs of the schedule the engine
actually ran, step by step, against the device's measured copy rate and matrix rate, beside the time each
step's work took on its stream; and the bytes of one decode step at the copy rate."""
import torch

from nanovllm.engine.scheduler import Batch
from nanovllm.partitions.streams import StreamTimer
from nanovllm.utils.timing import median_replay_ms


class ScheduleFloor:
    """Attach to an engine; every batch its runners launch adds that step's floor: the larger of the
    fewest bytes it must move (all weights once, the K/V it reads and writes) over the copy rate,
    and its FLOPs (weights and attention) over the matrix rate. Each step is also timed on its stream,
    from its start to the end of its sampling (host work that holds up its kernels included), so that
    by_kind() can say where a run's time over its floor goes."""

    def __init__(self, llm, copy_bytes_per_s: float, flops_per_s: float):
        runner = llm.runners[-1]
        hf = llm.config.hf_config
        self.copy_rate, self.flop_rate = copy_bytes_per_s, flops_per_s
        self.weight_bytes = parameter_bytes(runner.model)  # a tied lm_head counts once
        embedding = hf.vocab_size * hf.hidden_size
        # Every weight but the embedding lookup is a matrix-vector product per token; the lm_head
        # (tied or not) runs for one token per sequence and step.
        self.layer_flops_per_token = 2 * (sum(p.numel() for p in runner.model.model.layers.parameters()))
        self.head_flops_per_seq = 2 * embedding
        self.kv_bytes_per_token = runner.kv_cache.block_bytes // runner.block_size
        # Per query-key pair: q·k and p·v, 2 FLOPs per head dimension each, in every layer and head.
        self.attention_flops_per_pair = 4 * hf.num_hidden_layers * hf.num_attention_heads * hf.head_dim
        self.seconds = 0.0
        self.steps: list[tuple[bool, float, StreamTimer]] = []  # (prefill, floor seconds, its work's marks)
        for each in llm.runners:
            self._observe(each)

    def _observe(self, runner) -> None:
        launch = runner.launch

        def observed_launch(batch: Batch, *args, **kwargs):
            floor = self.step_seconds(batch)
            self.seconds += floor
            tokens = launch(batch, *args, **{**kwargs, "timed": True})
            self.steps.append((batch.is_prefill, floor, tokens.timer))
            return tokens

        runner.launch = observed_launch

    def by_kind(self) -> dict[str, dict[str, float]]:
        """For "prefill" and "decode" steps: how many ran, the seconds their work took on its stream and
        their floor. Steps of different streams (multiplexing) may overlap, so these may add up to more
        than the run's time."""
        kinds = {kind: {"steps": 0, "seconds": 0.0, "floor_s": 0.0} for kind in ("prefill", "decode")}
        for prefill, floor, timer in self.steps:
            kind = kinds["prefill" if prefill else "decode"]
            kind["steps"] += 1
            kind["seconds"] += timer.seconds()
            kind["floor_s"] += floor
        return kinds

    def step_seconds(self, batch: Batch) -> float:
        seqs, is_prefill = batch.seqs, batch.is_prefill
        new_tokens = sum(seq.num_scheduled_tokens for seq in seqs)
        # Query i of a chunk that follows c computed tokens sees c + i + 1 keys.
        pairs = sum(n * seq.num_computed_tokens + n * (n + 1) // 2
                    for seq in seqs for n in [seq.num_scheduled_tokens])
        # A prefill reads its cached prefix from memory (its own new keys stay on chip); a decode
        # step reads every cached token and the one it just wrote.
        kv_read = sum(seq.num_computed_tokens for seq in seqs) + (0 if is_prefill else new_tokens)
        bytes_moved = self.weight_bytes + self.kv_bytes_per_token * (kv_read + new_tokens)
        flops = (self.layer_flops_per_token * new_tokens + self.attention_flops_per_pair * pairs
                 + self.head_flops_per_seq * len(seqs))
        return max(bytes_moved / self.copy_rate, flops / self.flop_rate)


def parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def step_floor_ms(runner, batch: int, context: int, bandwidth: float, weight_reads: int = 1,
                  lm_head: bool = False) -> float:
    """Fewest bytes a decode step of `batch` sequences of `context` tokens moves (the layers' weights
    weight_reads times, with lm_head its weights once, every sequence's K and V once) over the copy
    bandwidth."""
    model = runner.model
    weight_bytes = weight_reads * parameter_bytes(model.model.layers)
    if lm_head:
        weight_bytes += parameter_bytes(model.lm_head)
    kv_bytes = batch * context * runner.kv_cache.block_bytes // runner.block_size
    return (weight_bytes + kv_bytes) / bandwidth * 1e3


def copy_bytes_per_s() -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_replay_ms({"copy": lambda: dst.copy_(src)}, repeats=10)["copy"]
    return 2 * (1 << 30) / (ms / 1e3)


def gemm_flops_per_s(size: int = 8192) -> float:
    """bf16 matrix-product rate on random data, from the median of a few products."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    ms = median_replay_ms({"gemm": lambda: a @ b}, repeats=10)["gemm"]
    return 2 * size ** 3 / (ms / 1e3)
