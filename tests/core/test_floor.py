"""The schedule floor counts each step's bytes and FLOPs from the batches the engine actually ran."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from benchmarks.floor import ScheduleFloor
from tests.helpers import BLOCK_SIZE, gpu

INF = float("inf")


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64)


def run(engine, copy_rate, flop_rate):
    floor = ScheduleFloor(engine, copy_rate, flop_rate)
    engine.generate([[7, 8, 9, 10, 11]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    del engine.model_runner.launch  # back to the class's method
    return floor


def test_bytes_of_one_prefill_and_two_decode_steps(engine):
    floor = run(engine, copy_rate=1.0, flop_rate=INF)
    # Prefill writes 5 tokens' K/V; the decode steps read 6 and 7 cached tokens and write one each.
    assert floor.seconds == 3 * floor.weight_bytes + floor.kv_bytes_per_token * (5 + 7 + 8)
    hf = engine.config.hf_config
    assert floor.kv_bytes_per_token == hf.num_hidden_layers * 2 * hf.num_key_value_heads * hf.head_dim * 4


def test_flops_of_one_prefill_and_two_decode_steps(engine):
    floor = run(engine, copy_rate=INF, flop_rate=1.0)
    pairs = 5 * 6 // 2 + 6 + 7  # causal prefill of 5 queries, then 6 and 7 keys for one query each
    assert floor.seconds == (7 * floor.layer_flops_per_token + pairs * floor.attention_flops_per_pair
                             + 3 * floor.head_flops_per_seq)


def test_steps_by_kind_split_the_floor_and_are_timed(engine):
    floor = run(engine, copy_rate=1.0, flop_rate=INF)
    kinds = floor.by_kind()
    assert {kind: each["steps"] for kind, each in kinds.items()} == {"prefill": 1, "decode": 2}
    assert kinds["prefill"]["floor_s"] == floor.weight_bytes + floor.kv_bytes_per_token * 5
    assert kinds["decode"]["floor_s"] == 2 * floor.weight_bytes + floor.kv_bytes_per_token * (7 + 8)
    assert all(each["seconds"] > 0 for each in kinds.values())


@gpu
def test_steps_are_timed_on_the_device(model_dir):
    """A runner without a stream of its own times its steps with events on the device's current stream,
    not by the host's launch."""
    engine = LLM(model_dir, device="cuda", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64)
    floor = run(engine, copy_rate=1.0, flop_rate=INF)
    assert engine.model_runner.stream is None
    assert all(timer.stream == torch.cuda.current_stream() for _, _, timer in floor.steps)
    assert all(timer.seconds() > 0 for _, _, timer in floor.steps)
    engine.exit()
