"""Bad input is refused with an error naming the problem, and leaves the engine able to serve."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from tests.helpers import BLOCK_SIZE, VOCAB_SIZE, logged, random_prompts
from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
VALID_PROMPTS = random_prompts([5, 40], seed=99)


@pytest.fixture(scope="module")
def expected(model_dir):
    """The valid requests' output on an engine that never saw bad input."""
    fresh = LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64)
    return [o["token_ids"] for o in fresh.generate(VALID_PROMPTS, GREEDY, use_tqdm=False)]


def assert_still_serves(llm: LLM, expected) -> None:
    assert llm.scheduler.is_finished()
    outputs = llm.generate(VALID_PROMPTS, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == expected
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == len(bm.blocks)


@pytest.mark.parametrize("prompt,error,match", [
    ([], ValueError, "empty prompt"),
    ([1] * 512, ValueError, "max_model_len"),  # the checkpoint's 512 positions bound max_model_len
    ([1, VOCAB_SIZE], ValueError, "token ids"),
    ([1, -1], ValueError, "token ids"),
    ("hello", ValueError, "tokenizer"),  # the test checkpoints have no tokenizer files
    ([1, 2.5], TypeError, "token ids"),
    (42, TypeError, "prompt"),
    (np.array(5), TypeError, r"one-dimensional, got one of shape \(\)"),
])
def test_bad_prompt(llm, expected, prompt, error, match):
    with pytest.raises(error, match=match):
        llm.generate([prompt], GREEDY, use_tqdm=False)
    assert_still_serves(llm, expected)


def test_bad_prompt_among_good_ones_queues_nothing(llm, expected):
    with pytest.raises(ValueError, match="^prompt 2: empty prompt"):
        llm.generate(VALID_PROMPTS + [[]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=rf"^prompt 1: token ids must be in \[0, {VOCAB_SIZE}\): token 2 of the "
                                         rf"prompt is {VOCAB_SIZE}$"):
        llm.generate([[1, 2], [3, 4, VOCAB_SIZE, 5]], GREEDY, use_tqdm=False)
    assert not llm.scheduler.waiting and not llm.scheduler.running
    assert_still_serves(llm, expected)


def test_longest_allowed_prompt(llm):
    outputs = llm.generate([[3] * 511], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                           use_tqdm=False)
    assert len(outputs[0]["token_ids"]) == 1  # max_model_len stops it after one token


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(max_tokens=-3), ValueError, "max_tokens"),
    (dict(max_tokens=2.0), TypeError, "max_tokens"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(ignore_eos="yes"), TypeError, "ignore_eos"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(top_k=5.0), TypeError, "top_k"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(top_p=0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(top_p="0.9"), TypeError, "top_p"),
    (dict(min_p=-0.1), ValueError, "min_p"),
    (dict(min_p=2), ValueError, "min_p"),
    (dict(min_p=None), TypeError, "min_p"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2 ** 63), ValueError, "seed"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(seed="7"), TypeError, "seed"),
    (dict(stop=""), ValueError, "stop"),
    (dict(stop=["ok", ""]), ValueError, "stop"),
    (dict(stop=[1]), TypeError, "stop"),
    (dict(stop=b"end"), TypeError, "stop"),
    (dict(stop_token_ids=[-1]), ValueError, "stop_token_ids"),
    (dict(stop_token_ids=7), TypeError, "stop_token_ids"),
    (dict(stop_token_ids=[1.0]), TypeError, "stop_token_ids"),
    (dict(stop_token_ids=[False]), TypeError, "stop_token_ids"),
    # Beyond what the sampler's float32 temperatures and top_k can hold.
    (dict(temperature=10 ** 400), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(top_k=2 ** 31), ValueError, "top_k"),
])
def test_bad_sampling_params(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_are_immutable_and_normalised():
    sp = SamplingParams(max_tokens=4, stop="end", stop_token_ids=[3, 4])
    with pytest.raises(dataclasses.FrozenInstanceError):
        sp.max_tokens = 0
    with pytest.raises(ValueError, match="max_tokens"):
        dataclasses.replace(sp, max_tokens=0)
    assert sp.stop == ("end",) and sp.stop_token_ids == (3, 4)
    assert SamplingParams(stop=None, stop_token_ids=None) == SamplingParams()


def test_sampling_params_the_model_cannot_serve(llm, expected):
    with pytest.raises(ValueError, match="stop"):  # the test checkpoints have no tokenizer files
        llm.generate(VALID_PROMPTS, [GREEDY, dataclasses.replace(GREEDY, stop="\n")], use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(VALID_PROMPTS, dataclasses.replace(GREEDY, stop_token_ids=[VOCAB_SIZE]), use_tqdm=False)
    with pytest.raises(ValueError, match="stop"):
        llm.add_request(VALID_PROMPTS[0], dataclasses.replace(GREEDY, stop=["a"]))
    assert_still_serves(llm, expected)


def test_bad_sampling_params_arguments_to_generate(llm, expected):
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(VALID_PROMPTS, [GREEDY], use_tqdm=False)
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate(VALID_PROMPTS, [{"temperature": 0.0}] * len(VALID_PROMPTS), use_tqdm=False)
    with pytest.raises(TypeError, match="prompts"):
        llm.generate("a string, not a list", GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match="use_tqdm must be a bool, got 'no'"):
        llm.generate(VALID_PROMPTS, GREEDY, use_tqdm="no")
    assert_still_serves(llm, expected)


@pytest.mark.parametrize("options,error,match", [
    (dict(unknown_option=1), TypeError, "unknown_option"),
    (dict(kvcache_block_size=24), ValueError, "kvcache_block_size"),
    (dict(kvcache_block_size=8), ValueError, "kvcache_block_size"),
    (dict(gpu_memory_utilization=0), ValueError, "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.5), ValueError, "gpu_memory_utilization"),
    (dict(max_num_seqs=0), ValueError, "max_num_seqs"),
    (dict(max_num_batched_tokens=0), ValueError, "max_num_batched_tokens"),
    (dict(max_model_len=0), ValueError, "max_model_len"),
    (dict(max_model_len=1), ValueError, "max_model_len"),  # no room for a prompt token and a generated one
    (dict(tensor_parallel_size=0), ValueError, "tensor_parallel_size"),
    (dict(tensor_parallel_size=3), ValueError, "tensor_parallel_size"),  # 4 heads / 2 kv heads
    (dict(enable_pipeline=True, tensor_parallel_size=2), ValueError, "enable_pipeline"),
    (dict(enable_two_gpu_pd=True, tensor_parallel_size=2), ValueError, "enable_two_gpu_pd"),
    # The CPU is one device: the error says what to pass there.
    (dict(enable_two_gpu_pd=True), ValueError, "pass prefill_device_id=0, decode_device_id=0"),
    (dict(num_kvcache_blocks=10 ** 9), ValueError, "num_kvcache_blocks: 1000000000 KV blocks of 16 tokens need"),
    (dict(attention_backend="magic"), ValueError, "attention_backend"),
    (dict(attention_backend="triton"), ValueError, "attention_backend"),  # needs CUDA
    (dict(num_kvcache_blocks=0), ValueError, "num_kvcache_blocks"),
    (dict(kv_cache_dtype="fp8"), ValueError, "kv_cache_dtype"),
    (dict(kv_cache_dtype=None), TypeError, "kv_cache_dtype"),
    (dict(kv_cache_dtype="fp8_e4m3", attention_backend="flash-attn"), ValueError, "kv_cache_dtype"),
    (dict(num_kvcache_blocks=3), ValueError, "KV cache"),  # fewer than one max_model_len sequence
    (dict(max_num_seqs="8"), TypeError, "max_num_seqs"),
    (dict(enforce_eager=1), TypeError, "enforce_eager"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(device=False), TypeError, "device"),
    (dict(device=0), TypeError, "device"),
    (dict(device=""), ValueError, "device"),
    (dict(dtype="int8"), ValueError, "dtype"),
])
def test_bad_options(model_dir, llm, expected, options, error, match):
    if options.get("attention_backend") == "triton" and torch.cuda.is_available():
        pytest.skip("the triton backend is valid where CUDA is available")
    with pytest.raises(error, match=match):
        LLM(model_dir, **{"device": "cpu", "kvcache_block_size": BLOCK_SIZE, **options})
    assert_still_serves(llm, expected)


@pytest.mark.parametrize("option, value, switch", [
    ("pipeline_attention_sm_count", 20, "enable_pipeline"), ("pipeline_ffn_sm_count", 8, "enable_pipeline"),
    ("pipeline_enable_profiling", True, "enable_pipeline"), ("pipeline_force", True, "enable_pipeline"),
    ("prefill_device_id", 1, "enable_two_gpu_pd"), ("decode_device_id", 0, "enable_two_gpu_pd"),
    ("prefill_num_kvcache_blocks", 64, "enable_two_gpu_pd"), ("pd_max_itl_ms", 10.0, "enable_pd_multiplexing"),
    ("pd_max_ttft_ms", 500.0, "enable_pd_multiplexing"),
])
def test_a_mode_option_needs_its_mode(model_dir, option, value, switch):
    with pytest.raises(ValueError, match=rf"invalid {option}: must be .* \(its default\) unless {switch}=True: it has "
                                         rf"no effect with the mode off, got {value!r}"):
        LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, **{option: value})


def test_tensor_parallel_size_beyond_the_gpus_is_refused_before_any_gpu_work(model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(ValueError, match=r"invalid tensor_parallel_size: must be at most the 1 CUDA device of this "
                                         r"machine \(rank r runs on cuda:r\)"):
        LLM(model_dir, device="cuda", tensor_parallel_size=2)


def test_max_model_len_beyond_the_model_is_capped_with_a_log_line(model_dir, caplog):
    llm = LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64, max_model_len=10 ** 6)
    assert llm.config.scheduler.max_model_len == 512
    assert logged(caplog, "Config") == ["max_model_len=1000000 is capped at the model's max_position_embeddings=512"]


def test_a_step_budget_whose_warm_up_runs_out_of_memory_is_named(model_dir, llm, expected, monkeypatch):
    """On a GPU the cache is sized after a prefill of max_num_batched_tokens tokens, which may not fit."""
    from nanovllm.engine.kv_cache import KVCache

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(KVCache, "blocks_that_fit", out_of_memory)
    with pytest.raises(ValueError, match=r"^invalid max_num_batched_tokens: the warm-up prefill of one full step "
                                         r"\(16384 tokens\) ran out of memory on cpu beside the weights"):
        LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE)
    monkeypatch.undo()
    assert_still_serves(llm, expected)


@pytest.mark.parametrize("utilization", [0.9, 0.3])
def test_the_cpu_cache_line_says_gpu_memory_utilization_does_not_size_it(model_dir, caplog, utilization):
    LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, gpu_memory_utilization=utilization)
    [line] = [m for m in logged(caplog, "ModelRunner") if m.startswith("KV cache: ")]
    assert line.endswith("GiB, sized for the CPU's 1 GiB (gpu_memory_utilization applies to GPUs)")


def test_max_num_seqs_beyond_the_cache_sizes_no_buffer_past_it(model_dir, expected):
    """A running sequence writes into a block of its own: the decode inputs hold as many rows as blocks."""
    llm = LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64, max_num_seqs=10 ** 12)
    assert llm.model_runner.decode_inputs.longs.shape == (4, 64)
    assert_still_serves(llm, expected)


def test_prompts_of_numpy_and_torch_integers(llm, expected):
    first, second = VALID_PROMPTS
    prompts = [np.array(first, dtype=np.int32), [torch.tensor(t) for t in second]]
    assert [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    assert [o["token_ids"] for o in llm.generate([torch.tensor(first), [np.int64(t) for t in second]], GREEDY,
                                                 use_tqdm=False)] == expected


@pytest.mark.parametrize("prompt,element", [([1, np.float32(2.0)], (1, "float32")), (np.array([1.0, 2.0]), (0, "float")),
                                            ([3, torch.tensor(True)], (1, "Tensor")), ([[1, 2]], (0, "list"))])
def test_prompt_elements_that_are_not_integers_are_named(llm, expected, prompt, element):
    index, kind = element
    with pytest.raises(TypeError, match=rf"element {index} of the prompt is .* \({kind}\)$"):
        llm.generate([prompt], GREEDY, use_tqdm=False)
    assert_still_serves(llm, expected)


def test_model_path_that_is_a_file(model_dir):
    with pytest.raises(ValueError, match="is a file: pass the checkpoint's directory"):
        LLM(str(Path(model_dir) / "config.json"), device="cpu")


def test_missing_model_directory(tmp_path, llm, expected):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(empty), device="cpu")
    assert_still_serves(llm, expected)


def test_model_path_of_wrong_type():
    with pytest.raises(TypeError, match="model"):
        LLM(123, device="cpu")


def test_config_of_another_architecture(tmp_path, llm, expected):
    LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="llama"):
        LLM(str(tmp_path), device="cpu")
    assert_still_serves(llm, expected)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path), device="cpu")


def test_checkpoint_without_weights(tmp_path, model_dir):
    config = json.loads((Path(model_dir) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(tmp_path), device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64)


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_float8_cache_backend_follows_the_compute_capability(monkeypatch, caplog, capability):
    """Before compute capability 8.9 the GPU has no float8 conversions, which the Triton kernels of a
    float8 cache use: "auto" then takes the torch backend with one log line, and "triton" is refused.
    Only the selection is exercised (it makes no CUDA call besides the capability query)."""
    from nanovllm.attention import selector
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(selector, "flash_attn_available", lambda: False)
    cuda = torch.device("cuda", 0)
    chosen = selector.select_backend("auto", cuda, BLOCK_SIZE, quantized_kv=True)
    assert selector.select_backend("auto", cuda, BLOCK_SIZE, quantized_kv=False).name == "triton"
    if capability < selector.FLOAT8_CAPABILITY:
        assert chosen.name == "torch"
        assert logged(caplog, "Attention") == ["the Triton kernels of a float8 KV cache need compute capability 8.9 "
                                               "or newer, this GPU has 8.0: using the torch backend"]
        with pytest.raises(ValueError, match="attention_backend='triton' with kv_cache_dtype='fp8_e4m3'"):
            selector.select_backend("triton", cuda, BLOCK_SIZE, quantized_kv=True)
    else:
        assert chosen.name == "triton" and not logged(caplog, "Attention")
        assert selector.select_backend("triton", cuda, BLOCK_SIZE, quantized_kv=True).name == "triton"
