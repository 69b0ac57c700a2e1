"""Greedy tokens do not depend on how requests are batched, cached, preempted or chunked."""
import pytest

from tests.helpers import BLOCK_SIZE, EngineRecorder, assert_idle, count_preemptions, random_prompts, tokens
from nanovllm import LLM, SamplingParams

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
MAX_MODEL_LEN = 160


@pytest.fixture(scope="module")
def prompts():
    stem = random_prompts([70], seed=21)[0]
    others = random_prompts([9, 64, 100, 30, 5], seed=22)
    return [
        stem + others[0],        # a long shared prefix with different tails
        stem[:48] + others[3],   # exactly three shared blocks
        stem,
        others[1],
        stem + others[4],
        others[2],
        stem[:20] + others[0],   # shares one block and a bit
        others[1],               # a duplicate request
    ]


@pytest.fixture(scope="module")
def alone(model_dir, prompts):
    """Each prompt on a fresh engine by itself: no batching, no cache hits, no preemption."""
    outputs = []
    for prompt in prompts:
        llm = LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64,
                  max_model_len=MAX_MODEL_LEN)
        outputs.append(llm.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"])
    assert all(len(o) == MAX_TOKENS for o in outputs)
    return outputs


def engine(model_dir, **options) -> LLM:
    return LLM(model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, **options)


def generate(llm: LLM, prompts) -> list[list[int]]:
    outputs = tokens(llm, prompts, GREEDY)
    assert_idle(llm)
    return outputs


def test_together_and_again_with_prefix_cache(model_dir, prompts, alone, monkeypatch):
    llm = engine(model_dir, num_kvcache_blocks=128)
    first = EngineRecorder(llm, monkeypatch)
    assert generate(llm, prompts) == alone
    assert max(first.batch_sizes) == len(prompts)
    monkeypatch.undo()

    second = EngineRecorder(llm, monkeypatch)
    assert generate(llm, prompts) == alone
    # Full prompt blocks computed by the first run are found again, and their tokens are not recomputed.
    assert sum(second.cached_tokens) >= 6 * BLOCK_SIZE
    computed = sum(stop - start for _, start, stop, _ in second.prefill_spans)
    assert computed == sum(map(len, prompts)) - sum(second.cached_tokens)


def test_shared_prefix_hits_within_one_generate_call(model_dir, prompts, alone, monkeypatch):
    # One sequence per prefill step, so later prompts find the stem computed by earlier ones.
    llm = engine(model_dir, num_kvcache_blocks=128, max_num_seqs=1)
    observer = EngineRecorder(llm, monkeypatch)
    assert generate(llm, prompts) == alone
    assert max(observer.batch_sizes) == 1
    assert sum(observer.cached_tokens) >= 3 * BLOCK_SIZE


def test_preemption(model_dir, prompts, alone, monkeypatch):
    preempted = count_preemptions(monkeypatch)
    # 10 blocks is the least that one sequence of max_model_len needs; the batch needs far more.
    llm = engine(model_dir, num_kvcache_blocks=MAX_MODEL_LEN // BLOCK_SIZE)
    assert generate(llm, prompts) == alone
    assert len(preempted) > 0


def test_chunked_prefill(model_dir, prompts, alone, monkeypatch):
    budget = 24
    llm = engine(model_dir, num_kvcache_blocks=128, max_num_batched_tokens=budget)
    observer = EngineRecorder(llm, monkeypatch)
    assert generate(llm, prompts) == alone
    assert all(stop - start <= budget for _, start, stop, _ in observer.prefill_spans)
    split = {sid for sid, _, stop, num_tokens in observer.prefill_spans if stop < num_tokens}
    assert len(split) >= 5  # the prompts longer than the budget
    chunks = {}
    for sid, start, stop, num_tokens in observer.prefill_spans:
        chunks.setdefault(sid, []).append((start, stop, num_tokens))
    for spans in chunks.values():
        # Without preemption a prompt's chunks follow each other and end at its last token.
        assert all(prev[1] == nxt[0] for prev, nxt in zip(spans, spans[1:]))
        assert spans[-1][1] == spans[-1][2]


def test_preemption_chunking_and_caching_together(model_dir, prompts, alone, monkeypatch):
    llm = engine(model_dir, num_kvcache_blocks=12, max_num_batched_tokens=40, max_num_seqs=3)
    observer = EngineRecorder(llm, monkeypatch)
    assert generate(llm, prompts[::-1]) == alone[::-1]
    assert observer.preempted
    assert sum(observer.cached_tokens) > 0
    assert max(observer.batch_sizes) <= 3
    assert observer.chunked


def test_float8_cache_preemption_chunking_and_caching(model_dir, prompts, monkeypatch):
    """With a float8 cache, prompts attend to their own keys and values as the cache holds them, so
    cached prefixes, chunks and recomputation after preemption give the same tokens as a lone prompt."""
    fp8 = dict(kv_cache_dtype="fp8_e4m3")
    alone = [generate(engine(model_dir, num_kvcache_blocks=64, **fp8), [prompt])[0] for prompt in prompts]
    llm = engine(model_dir, num_kvcache_blocks=12, max_num_batched_tokens=40, max_num_seqs=3, **fp8)
    observer = EngineRecorder(llm, monkeypatch)
    assert generate(llm, prompts[::-1]) == alone[::-1]
    assert observer.preempted and sum(observer.cached_tokens) > 0
