"""When a request stops, and the finish_reason it reports: end-of-sequence and stop tokens, stop
strings (with the Qwen tokenizer that the model maker writes), max_tokens and max_model_len."""
import random
import shutil
from dataclasses import replace

import pytest

from tests.helpers import BLOCK_SIZE, VOCAB_SIZE
from nanovllm import LLM, SamplingParams
from nanovllm.engine.stop_strings import StopStrings
from nanovllm.tools.make_model import write_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64)


@pytest.fixture(scope="module")
def text_llm(tiny_model_dir, tmp_path_factory):
    """The tiny model with Qwen's tokenizer: its 512 token ids are bytes (many of them halves of
    characters) and early merges."""
    path = tmp_path_factory.mktemp("tiny_with_tokenizer")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    write_tokenizer(path)
    return LLM(str(path), device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64)


def test_stop_tokens_end_of_sequence_and_length(llm, monkeypatch):
    full = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0]
    assert full["finish_reason"] == "length" and len(full["token_ids"]) == GREEDY.max_tokens
    tokens = full["token_ids"]
    k = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    unused = next(t for t in range(VOCAB_SIZE) if t not in tokens)

    def run(**options):
        return llm.generate([PROMPT], replace(GREEDY, **options), use_tqdm=False)[0]

    # Stop tokens stop even with ignore_eos, which ignores only the end-of-sequence tokens.
    out = run(stop_token_ids=[unused, tokens[k]])
    assert out["token_ids"] == tokens[:k + 1] and out["finish_reason"] == "stop"
    monkeypatch.setattr(llm.scheduler, "eos_token_ids", {tokens[k]})
    out = run(ignore_eos=False)
    assert out["token_ids"] == tokens[:k + 1] and out["finish_reason"] == "stop"
    out = run()
    assert out["token_ids"] == tokens and out["finish_reason"] == "length"
    out = run(ignore_eos=False, max_tokens=k + 1)  # the last token allowed is also the end of sequence
    assert out["token_ids"] == tokens[:k + 1] and out["finish_reason"] == "stop"
    assert run(max_tokens=k)["finish_reason"] == "length"


def test_max_model_len_is_a_length_finish(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=64, max_model_len=20)
    out = llm.generate([PROMPT], replace(GREEDY, max_tokens=100), use_tqdm=False)[0]
    assert len(out["token_ids"]) == 20 - len(PROMPT) and out["finish_reason"] == "length"


def clean_span_across_a_token_boundary(tokenizer, tokens: list[int], text: str) -> tuple[int, str]:
    """A 4-character piece of text whose middle is a token boundary and which, like its last three
    characters, occurs nowhere before."""
    for j in range(3, len(tokens)):
        boundary = len(tokenizer.decode(tokens[:j]))
        piece = text[boundary - 2:boundary + 2]
        if len(piece) == 4 and "\ufffd" not in piece and text.find(piece) == boundary - 2 \
                and text.find(piece[1:]) == boundary - 1 and tokenizer.decode(tokens[:j]) == text[:boundary]:
            return boundary - 2, piece
    raise AssertionError(f"no clean stop string in {text!r}")


def test_stop_strings_end_the_text_before_them(text_llm):
    tokenizer = text_llm.tokenizer
    params = replace(GREEDY, max_tokens=40)
    full = text_llm.generate([PROMPT], params, use_tqdm=False)[0]
    tokens, text = full["token_ids"], full["text"]
    assert text == tokenizer.decode(tokens) and full["finish_reason"] == "length"
    start, stop = clean_span_across_a_token_boundary(tokenizer, tokens, text)
    # vLLM's token_ids: up to and including the token that completes the stop string.
    completing = next(m for m in range(1, len(tokens) + 1) if stop in tokenizer.decode(tokens[:m]))

    # The text ends before the stop string that starts first, whatever their order in the list.
    prompts = [PROMPT, PROMPT, PROMPT, [40, 41]]
    outputs = text_llm.generate(prompts, [replace(params, stop=stop), replace(params, stop=[stop[1:], stop]),
                                          replace(params, stop="never\x00"), params], use_tqdm=False)
    for out in outputs[:2]:
        assert out["text"] == text[:start] and out["token_ids"] == tokens[:completing]
        assert out["finish_reason"] == "stop"
    assert outputs[2] == full
    alone = text_llm.generate([[40, 41]], params, use_tqdm=False)[0]
    assert outputs[3] == alone


@pytest.fixture(scope="module")
def tokenizer(text_llm):
    return text_llm.tokenizer


def feed(tokenizer, stop: tuple[str, ...], completion: list[int], prompt=(1, 2)) -> tuple[StopStrings, int | None]:
    """Feeds the completion a token at a time; the detector and how many tokens it took to stop."""
    detector = StopStrings(stop, len(prompt))
    token_ids = list(prompt)
    for n, token_id in enumerate(completion, 1):
        token_ids.append(token_id)
        if detector.update(tokenizer, token_ids):
            return detector, n
    return detector, None


@pytest.mark.parametrize("stop,before", [("🎉", "Hé, 你好 wörld "), ("你好", "Hé, "), ("ld 🎉", "Hé, 你好 wör"),
                                         ("d", "Hé, 你好 wörl"), ("end", "Hé, 你好 wörld 🎉 "), ("Hé", "")])
def test_stop_string_detector_on_characters_split_across_tokens(tokenizer, stop, before):
    text = "Hé, 你好 wörld 🎉 end and more"
    completion = tokenizer.encode(text, add_special_tokens=False)
    detector, used = feed(tokenizer, (stop, "never"), completion)
    assert detector.matched and detector.text == before
    # It stops at the token that completes the stop string.
    assert stop in tokenizer.decode(completion[:used]) and stop not in tokenizer.decode(completion[:used - 1])


def test_stop_string_detector_text_is_the_decoded_text(tokenizer):
    """Without a match, the text built a token at a time is the whole completion decoded."""
    rng = random.Random(0)
    for _ in range(20):
        completion = [rng.randrange(VOCAB_SIZE) for _ in range(30)] + tokenizer.encode(" ok", add_special_tokens=False)
        detector, used = feed(tokenizer, ("never\x00",), completion)
        assert used is None and detector.text == tokenizer.decode(completion)

