import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from nanovllm.engine.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # the tiny preset's checkpoint (tests/core/conftest.py), with Qwen's tokenizer

TEXTS = ["Hello, world! 你好 café\n\tdef f(x):\n        return x ** 2  ", "<|im_start|>user\nhi<|im_end|>",
         "  leading spaces and 🎉 emoji", "a" * 40 + " 123 4567"]


def test_plain_fast_tokenizer_matches_auto_tokenizer(tiny_preset):
    plain, auto = load_tokenizer(str(tiny_preset)), AutoTokenizer.from_pretrained(tiny_preset)
    assert type(plain).__name__ != type(auto).__name__  # the fast path was taken
    for text in TEXTS:
        ids = auto.encode(text)
        assert plain.encode(text) == ids
        assert plain.decode(ids) == auto.decode(ids)
        assert plain.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    chat = [{"role": "user", "content": "hi"}]
    assert (plain.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert (plain.eos_token_id, plain.pad_token_id, len(plain)) == (auto.eos_token_id, auto.pad_token_id, len(auto))


def test_other_tokenizer_classes_load_through_auto_tokenizer(tiny_preset, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_preset / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    assert type(load_tokenizer(str(tmp_path))).__name__ == "GPT2Tokenizer"


def test_plain_fast_path_does_not_import_auto_tokenizer(tiny_preset):
    code = ("import sys; from nanovllm.engine.tokenizer import load_tokenizer; import nanovllm; "
            f"load_tokenizer({str(tiny_preset)!r}); "
            "print('transformers.models.auto.tokenization_auto' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
