"""Many requests of random shapes through a small KV cache: all finish, once, in order, and nothing leaks."""
import random

from tests.helpers import BLOCK_SIZE, TINY_EOS, VOCAB_SIZE, count_preemptions
from nanovllm import LLM, SamplingParams

NUM_REQUESTS = 200
MAX_MODEL_LEN = 192


def make_requests(seed: int):
    rng = random.Random(seed)
    stem = [rng.randrange(2, VOCAB_SIZE) for _ in range(80)]
    prompts, params = [], []
    for _ in range(NUM_REQUESTS):
        tail = [rng.randrange(2, VOCAB_SIZE) for _ in range(rng.randrange(1, 100))]
        prompts.append(stem[:rng.randrange(0, 80)] + tail if rng.random() < 0.3 else tail)
        params.append(SamplingParams(temperature=rng.choice([0.0, 0.0, 0.7, 1.5]), max_tokens=rng.randrange(1, 30),
                                     ignore_eos=rng.random() < 0.5))
    return prompts, params


def test_many_random_requests(tiny_model_dir, monkeypatch):
    preemptions = count_preemptions(monkeypatch)
    llm = LLM(tiny_model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=60,
              max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=512, max_num_seqs=48)
    finished_ids = []
    step = llm.loop.step  # what generate() steps

    def recording_step():
        produced = step()
        finished_ids.extend(seq.seq_id for seq, _ in produced if seq.is_finished)
        return produced

    monkeypatch.setattr(llm.loop, "step", recording_step)
    prompts, params = make_requests(seed=5)
    outputs = llm.generate(prompts, params, use_tqdm=False)

    assert len(outputs) == NUM_REQUESTS
    assert len(finished_ids) == len(set(finished_ids)) == NUM_REQUESTS, "each request finishes exactly once"
    assert preemptions, "the cache is small enough to force preemption"
    for out, prompt, sp in zip(outputs, prompts, params):
        tokens = out["token_ids"]
        assert all(0 <= t < VOCAB_SIZE for t in tokens)
        assert out["text"] == ""  # no tokenizer files
        limit = min(sp.max_tokens, MAX_MODEL_LEN - len(prompt))
        if sp.ignore_eos or TINY_EOS not in tokens:
            assert len(tokens) == limit and out["finish_reason"] == "length"
        else:
            assert tokens.index(TINY_EOS) == len(tokens) - 1 and len(tokens) <= limit
            assert out["finish_reason"] == "stop"
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == len(bm.blocks) == 60
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert all(bm.blocks[block_id].hash == h for h, block_id in bm.hash_to_block_id.items())
    assert len(set(bm.hash_to_block_id.values())) == len(bm.hash_to_block_id)

    # Outputs are in prompt order: the greedy requests, run again alone in reverse order, agree.
    greedy = [i for i, sp in enumerate(params) if sp.temperature == 0][:20]
    again = llm.generate([prompts[i] for i in reversed(greedy)], [params[i] for i in reversed(greedy)],
                         use_tqdm=False)
    assert [o["token_ids"] for o in reversed(again)] == [outputs[i]["token_ids"] for i in greedy]
