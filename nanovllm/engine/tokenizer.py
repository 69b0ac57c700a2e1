"""Loading a checkpoint's tokenizer. A tokenizer.json of a family whose tokenizer class adds nothing to it
loads as a plain fast tokenizer: AutoTokenizer's import pulls in transformers' generation and distributed
code, which took half of `import nanovllm` (about 8 s) on a GPU machine with accelerate and scikit-learn."""
import json
import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# tokenizer_class values whose tokenizers are their tokenizer.json and tokenizer_config.json, nothing more.
PLAIN_FAST_CLASSES = {None, "PreTrainedTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast"}


def load_tokenizer(path: str):
    """The tokenizer in the checkpoint directory, None where it has no tokenizer files; a ValueError naming
    the files where they cannot be read."""
    present = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(path, f))]
    if not present:
        return None
    try:
        if "tokenizer.json" in present and _tokenizer_class(path) in PLAIN_FAST_CLASSES:
            from transformers import PreTrainedTokenizerFast
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # each tokenizer file format fails in its own way
        raise ValueError(f"cannot read the tokenizer files {', '.join(present)} in {path}: {e!r}") from None
    # Without its vocabulary file a tokenizer can still load, from its added tokens alone.
    if not tokenizer.encode("a", add_special_tokens=False):
        raise ValueError(f"the tokenizer files {', '.join(present)} in {path} encode no text: the vocabulary "
                         "(tokenizer.json, or vocab.json and merges.txt) is missing")
    return tokenizer


def _tokenizer_class(path: str) -> str | None:
    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(config):
        return None
    with open(config) as f:
        return json.load(f).get("tokenizer_class")
