"""What the tests of the two-runner modes share: prefill/decode disaggregation (test_two_gpu.py, at the top
of the repository) and multiplexing (tests/modes/test_multiplexing.py). Both run a PDLoop
(nanovllm/modes/disaggregation/loop.py) and compare its greedy tokens with the single-runner engine's."""
import pytest

from nanovllm import LLM, SamplingParams
from tests.helpers import BLOCK_SIZE, PROMPT_LENGTHS, random_prompts, tokens

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
MAX_MODEL_LEN = 160
BLOCKS_PER_SEQ = MAX_MODEL_LEN // BLOCK_SIZE

def mixed_prompts():
    """The `prompts` fixture's prompts (tests/conftest.py), and prompts that share a prefix of full blocks with
    an earlier one."""
    prompts = random_prompts(PROMPT_LENGTHS, seed=1234)
    return prompts + [prompts[3][:48] + [5, 6, 7], prompts[3] + [9], prompts[4][:32]]


# (checkpoint, options) -> the single-runner engine's tokens for mixed_prompts(), once per session.
_SINGLE_RUNNER_TOKENS: dict[tuple, list[list[int]]] = {}


def single_runner_tokens(model_dir, **options) -> list[list[int]]:
    """The single-runner engine's greedy tokens for mixed_prompts() (computed once per session for each
    checkpoint and options: the disaggregation and the multiplexing tests compare with the same ones)."""
    key = (model_dir, tuple(sorted(options.items())))
    if key not in _SINGLE_RUNNER_TOKENS:
        llm = LLM(model_dir, kvcache_block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, num_kvcache_blocks=64,
                  **options)
        _SINGLE_RUNNER_TOKENS[key] = tokens(llm, mixed_prompts(), GREEDY)
        llm.exit()
    return _SINGLE_RUNNER_TOKENS[key]


@pytest.fixture(scope="session")
def expected(model_dir):
    """The single-runner engine's tokens on CPU."""
    return single_runner_tokens(model_dir, device="cpu")


@pytest.fixture(scope="session")
def cuda_expected(model_dir):
    """On CUDA in float32, with decode CUDA graphs."""
    return single_runner_tokens(model_dir, device="cuda", dtype="float32")


def generate_twice(llm, expected, monkeypatch, check_invariants, assert_idle) -> tuple[dict, dict]:
    """Generates mixed_prompts() twice, the second time with prefix-cache hits, checking the tokens
    both times, check_invariants(llm) after every step of the loop and assert_idle(llm) after each run;
    returns the PD statistics after each run."""
    step = llm.loop.step  # what generate() steps
    monkeypatch.setattr(llm.loop, "step", lambda: (step(), check_invariants(llm))[0])
    stats = []
    for _ in range(2):
        assert tokens(llm, mixed_prompts(), GREEDY) == expected
        assert_idle(llm)
        stats.append(llm.get_pd_statistics())
    return stats[0], stats[1]


def collect(step_outputs, outputs: dict) -> None:
    """Adds the new tokens of llm.step()'s outputs to each request's list in outputs."""
    for request_id, new_tokens, _ in step_outputs:
        outputs.setdefault(request_id, []).extend(new_tokens)


def streaming(llm):
    """step() that gathers each request's tokens into the returned dict."""
    streamed = {}

    def step():
        collect(llm.step(), streamed)

    return streamed, step


class Held:
    """Launched work (a prefill's tokens, a KV transfer) that reports itself unfinished until the test
    releases it."""

    def __init__(self, work):
        self.work, self.released = work, False

    def __getattr__(self, name):
        return getattr(self.work, name)

    def ready(self):
        return self.released and self.work.ready()

    def done(self):
        return self.released and self.work.done()


def hold(monkeypatch, owner, method: str) -> list[Held]:
    """Makes owner.method return its work held; returns the list of held work."""
    held, original = [], getattr(owner, method)

    def held_call(*args, **kwargs):
        held.append(Held(original(*args, **kwargs)))
        return held[-1]

    monkeypatch.setattr(owner, method, held_call)
    return held


def shared_weights(prefill_runner, decode_runner) -> bool:
    """Whether the two runners' models use the same weight and buffer tensors."""
    params = list(zip(prefill_runner.model.parameters(), decode_runner.model.parameters(), strict=True))
    buffers = list(zip(prefill_runner.model.buffers(), decode_runner.model.buffers(), strict=True))
    return bool(params) and bool(buffers) and all(a.data_ptr() == b.data_ptr() for a, b in params + buffers)
