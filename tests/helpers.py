"""Test helpers: tiny random Qwen3 checkpoints written with transformers, and their greedy outputs.

The checkpoints are small enough for CPU float32. A large initializer_range and a scaled-up final norm
give wide gaps between the top logits, so that greedy decoding does not flip on rounding differences
between batch shapes.
"""
import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import random
import tempfile

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

# Markers (registered in pyproject.toml) with the conditions that skip the tests where the hardware is absent:
# `-m gpu` selects the tests that need a CUDA device, `-m multi_gpu` those that need two.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                    reason=f"needs 2 CUDA devices, found {torch.cuda.device_count()}")
GPU = [pytest.mark.gpu, needs_cuda]
MULTI_GPU = [pytest.mark.gpu, pytest.mark.multi_gpu, needs_two_gpus]


def _green_contexts_unusable() -> str | None:
    """Why CUDA green contexts cannot be used on this machine, or None where they can."""
    from nanovllm.partitions import green
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if green.green_ctx is None:
        return "cuda-python not installed"
    try:
        if green.green_ctx.driver_version() < green.MIN_DRIVER_VERSION:
            return "CUDA driver older than 12.4"
    except RuntimeError as e:
        return str(e)
    return None


def needs_green(test):
    """Marks a test gpu and skips it where green contexts (SM partitions) cannot be used."""
    reason = _green_contexts_unusable()
    test = pytest.mark.skipif(reason is not None, reason=f"green contexts unusable: {reason}")(test)
    return pytest.mark.gpu(test)


def gpu(test):
    """Marks a test (function or class) gpu and skips it without a CUDA device."""
    for mark in GPU:
        test = mark(test)
    return test


def multi_gpu(test):
    """Marks a test gpu and multi_gpu and skips it with fewer than two CUDA devices."""
    for mark in MULTI_GPU:
        test = mark(test)
    return test


BLOCK_SIZE = 16
VOCAB_SIZE = 512
MAX_POSITIONS = 512
TINY_EOS = 1
MAX_NEW_TOKENS = 32

# Seeds chosen so that no greedy step of the parity prompts has a near tie between the top two logits.
MODEL_VARIANTS = {
    "tied": dict(seed=0, tie_word_embeddings=True, num_hidden_layers=2),
    "untied": dict(seed=1, tie_word_embeddings=False, num_hidden_layers=3),
    "rope_theta": dict(seed=7, tie_word_embeddings=False, num_hidden_layers=2, rope_theta=1_000_000.0),
    "rope_linear": dict(seed=3, tie_word_embeddings=True, num_hidden_layers=2,
                        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope_yarn": dict(seed=4, tie_word_embeddings=False, num_hidden_layers=2,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
}


# Mixed lengths: shorter than a block, exact multiples of the block size, and several blocks.
# One layer and an end-of-sequence token, for tests that run many requests.
TINY_EOS_VARIANT = dict(seed=101, tie_word_embeddings=True, num_hidden_layers=1, eos_token_id=TINY_EOS)
PROMPT_LENGTHS = [3, 17, 16, 120, 64, 45, 7, 99]


def qwen3_config(tie_word_embeddings: bool, num_hidden_layers: int, rope_theta: float = 10000.0,
                 rope_scaling: dict | None = None, eos_token_id: int | None = None, num_key_value_heads: int = 2,
                 head_dim: int = 16) -> Qwen3Config:
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers,
        num_attention_heads=4, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.2, tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=None)
    rope = dict(rope_scaling or {}, rope_theta=rope_theta)
    rope.setdefault("rope_type", "default")
    if hasattr(config, "rope_parameters"):  # transformers >= 5
        config.rope_parameters = rope
    else:
        config.rope_theta = rope.pop("rope_theta")
        config.rope_scaling = rope if rope["rope_type"] != "default" else None
    return config


def build_checkpoint(path, seed: int, **variant) -> None:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(**variant)).float().eval()
    with torch.no_grad():
        # Norm weights start at one; randomise them so that loading them wrongly changes the output,
        # and scale the final norm up for larger gaps between the top logits.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(3.0 if name == "model.norm.weight" else 1.0, 0.3)
    model.save_pretrained(path)


# (seed, variant) -> directory: every test module of the session reads the same checkpoint.
_CHECKPOINTS: dict[str, str] = {}


def shared_checkpoint(tmp_path_factory, **variant) -> str:
    """The directory of a checkpoint built with build_checkpoint(**variant), once per test session."""
    key = repr(sorted(variant.items()))
    if key not in _CHECKPOINTS:
        path = tmp_path_factory.mktemp("qwen3")
        build_checkpoint(path, **variant)
        _CHECKPOINTS[key] = str(path)
    return _CHECKPOINTS[key]


def checkpoint_fixture(scope: str, **variant):
    """A pytest fixture of that scope: the directory of the session's checkpoint of build_checkpoint(**variant)
    (built once, whichever module asks first)."""
    @pytest.fixture(scope=scope)
    def fixture(tmp_path_factory):
        return shared_checkpoint(tmp_path_factory, **variant)
    return fixture


def random_prompts(lengths, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB_SIZE) for _ in range(n)] for n in lengths]


def hf_greedy(model_path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt alone with transformers, never stopping early.

    With no end-of-sequence token there is nothing to stop on, and nothing is suppressed either, which
    is what ignore_eos=True does in nanovllm (min_new_tokens would instead forbid the eos token).
    """
    model = Qwen3ForCausalLM.from_pretrained(model_path).float().eval()
    model.generation_config.eos_token_id = None
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            input_ids = torch.tensor([prompt])
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=0)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs


def tokens(llm, prompts, params) -> list[list[int]]:
    """The tokens that llm.generate gives each prompt."""
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


def count_preemptions(monkeypatch) -> list[int]:
    """The ids of the sequences that any Scheduler preempts from now on, in order."""
    from nanovllm.engine.scheduler import Scheduler
    preempted, original = [], Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt", lambda self, seq: (preempted.append(seq.seq_id), original(self, seq))[1])
    return preempted


class EngineRecorder:
    """What an engine did, seen through the runner and the block manager it really uses, from now on."""

    def __init__(self, llm, monkeypatch):
        from nanovllm.engine.sequence import PENDING_TOKEN
        self.prefill_spans: list[tuple[int, int, int, int]] = []  # seq_id, start, stop, num_tokens
        self.batch_sizes: list[int] = []  # of every step
        self.decode_batch_sizes: list[int] = []
        self.ran_ahead = 0  # sequences launched while their last token was still in flight
        self.cached_tokens: list[int] = []  # the prefix-cache hit of each sequence placed
        self.preempted = count_preemptions(monkeypatch)
        launch, allocate = llm.model_runner.launch, llm.scheduler.block_manager.allocate

        def observed_launch(batch, *args, **kwargs):
            seqs = batch.seqs
            if batch.is_prefill:
                self.prefill_spans += [(s.seq_id, s.scheduled_positions.start, s.scheduled_positions.stop,
                                        s.num_tokens) for s in seqs]
            else:
                self.decode_batch_sizes.append(len(seqs))
            self.batch_sizes.append(len(seqs))
            self.ran_ahead += sum(s.last_token == PENDING_TOKEN for s in seqs)
            return launch(batch, *args, **kwargs)

        def observed_allocate(seq):
            placed = allocate(seq)
            if placed:
                self.cached_tokens.append(seq.num_cached_tokens)
            return placed

        monkeypatch.setattr(llm.model_runner, "launch", observed_launch)
        monkeypatch.setattr(llm.scheduler.block_manager, "allocate", observed_allocate)

    @property
    def chunked(self) -> int:
        """Prefill spans that stopped short of their sequence's end."""
        return sum(stop < num_tokens for _, _, stop, num_tokens in self.prefill_spans)


def fail_on_call(monkeypatch, owner, name: str, n: int, error: BaseException) -> None:
    """owner.name raises error at its nth call from now on; the calls before it run as they did."""
    original, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def assert_idle(llm) -> None:
    """No request left, and every block of each block manager (the prefill side's too, in the two-runner
    modes) free and consistent."""
    assert not llm.has_unfinished_requests()
    scheduler = llm.scheduler
    for bm in {scheduler.block_manager, getattr(scheduler, "prefill_manager", scheduler.block_manager)}:
        check_consistent(bm, [])
        assert bm.num_free_blocks == len(bm.blocks)


# Measured on the five HF-parity checkpoints (8 prompts x 32 tokens, per-head scales): greedy agreement
# 0.25-0.49 (a bfloat16 model against float32 gets 0.55: these tiny models amplify rounding), teacher-forced
# top-1 agreement 0.86-0.93, max |error| / logit range 0.08-0.18, mean 0.008-0.010. Scales 8x too small
# (saturating) give 0.008-0.03, 0.17-0.29, 0.71-0.94 and 0.09-0.11.
def assert_fp8_quality(result: dict) -> None:
    """benchmarks.quality.compare's result for a float8 KV cache against a float32 one, on the `prompts`
    fixture's prompts, is within the bounds that tell per-head scales from saturating ones."""
    assert result["greedy_agreement"] > 0.15
    assert result["forced_top1_agreement"] > 0.75
    assert result["max_abs_error/range"] < 0.3
    assert 1e-3 < result["mean_abs_error/range"] < 0.02


def check_consistent(bm, live) -> None:
    """Reference counts, the free list and the hash map agree with the live sequences' block tables."""
    refs = [0] * len(bm.blocks)
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table), "a block appears twice in one table"
        for block_id in seq.block_table:
            refs[block_id] += 1
    assert [b.ref_count for b in bm.blocks] == refs
    assert set(bm.free_block_ids) == {i for i, r in enumerate(refs) if r == 0}
    for h, block_id in bm.hash_to_block_id.items():
        assert bm.blocks[block_id].hash == h


def stream_to_completion(llm, request_ids: list[int]) -> list[list[int]]:
    """Steps llm until it is idle and returns each request's streamed tokens, checking that every
    request finishes exactly once and reports nothing after it finished."""
    streamed, finished = {i: [] for i in request_ids}, []
    while llm.has_unfinished_requests():
        for request_id, new_tokens, done in llm.step():
            assert request_id not in finished, "a request reported tokens after it finished"
            streamed[request_id] += new_tokens
            if done:
                finished.append(request_id)
    assert sorted(finished) == sorted(request_ids)
    return [streamed[i] for i in request_ids]


@contextlib.contextmanager
def propagating_logs():
    """The library's log records reach the root logger, and so pytest's caplog, while the context is open,
    from INFO on whatever $NANOVLLM_LOG_LEVEL says: the tests assert on INFO lines. The "nanovllm" logger
    writes to stdout itself and does not propagate (nanovllm/utils/log.py)."""
    logger = logging.getLogger("nanovllm")
    propagate, level = logger.propagate, logger.level
    logger.propagate = True
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    try:
        yield
    finally:
        logger.propagate = propagate
        logger.setLevel(level)


def logged(caplog, name: str, level: int = logging.INFO) -> list[str]:
    """The messages that the library's logger "nanovllm.<name>" wrote at `level` during the test."""
    return [r.getMessage() for r in caplog.records if r.name == f"nanovllm.{name}" and r.levelno == level]


# Where the forkserver's children (forked tensor-parallel workers) write their output: the forkserver starts
# when collection ends, outside any test's output capture.
FORKSERVER_LOG = os.path.join(tempfile.gettempdir(), f"nanovllm-tests-forked-workers-{os.getpid()}.log")


def start_forkserver() -> bool:
    """Starts (once per session) the forkserver that some tensor-parallel tests fork their workers from, with
    nanovllm's worker module imported in it, and returns whether there is one (Linux: yes). The server's
    imports run beside whatever the session does next; its children inherit its environment and write their
    output to FORKSERVER_LOG."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    multiprocessing.get_context("forkserver").set_forkserver_preload(["nanovllm.engine.tp_worker"])
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the tests' models are tiny: one thread per rank (tests/conftest.py)
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(FORKSERVER_LOG, "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            multiprocessing.forkserver.ensure_running()
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    return True
