"""Reading a Hugging Face checkpoint's config.json and generation_config.json: the fields the engine
builds the model from, checked before any weight is allocated, and the end-of-sequence tokens."""
import json
import math
import os
from dataclasses import dataclass

from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from nanovllm.layers.rotary_embedding import ROPE_TYPES, rope_parameters
from nanovllm.models import MODEL_TYPES
from nanovllm.utils.log import get_logger

logger = get_logger("Config")

# Fields of config.json that size the model's weights: without them transformers would fill in the
# sizes of some other model.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads")


@dataclass
class Checkpoint:
    path: str
    hf_config: PretrainedConfig
    eos_token_ids: tuple[int, ...]


def read_checkpoint(path: str) -> Checkpoint:
    """The checkpoint at path; a ValueError naming the file and the field where it cannot be used."""
    if os.path.isfile(path):
        raise ValueError(f"model path {path!r} is a file: pass the checkpoint's directory (the one holding "
                         "config.json and the *.safetensors files)")
    if not os.path.isdir(path):
        raise ValueError(f"model directory {path!r} does not exist")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"model directory {path!r} has no config.json")
    written = _read_json(config_file)
    model_type = written.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{config_file} describes model_type {model_type!r}; nanovllm supports "
                         f"{', '.join(repr(t) for t in MODEL_TYPES)} (dense Qwen3) only")
    for name in SIZE_FIELDS:  # before transformers, whose own errors for these fields name other fields
        if name not in written:
            raise ValueError(f"{config_file} has no {name}: it is needed to size the model's weights")
        _check(config_file, name, written[name], _is_positive_int(written[name]), "a positive integer")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers reports a malformed config with many kinds of exception
        raise ValueError(f"cannot read {config_file}: {e}") from None
    _check_model_fields(config_file, hf_config)
    return Checkpoint(path, hf_config, _eos_token_ids(path, hf_config))


def _read_json(file: str) -> dict:
    try:
        with open(file) as f:
            written = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None
    if not isinstance(written, dict):
        raise ValueError(f"cannot read {file}: it holds a {type(written).__name__}, not an object")
    return written


def _check(file: str, name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{file}: {name} must be {allowed}, got {value!r}")


def _check_model_fields(file: str, hf_config: PretrainedConfig) -> None:
    """The fields the engine builds the model from."""
    value = getattr(hf_config, "max_position_embeddings", None)
    _check(file, "max_position_embeddings", value, _is_positive_int(value), "a positive integer")
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    _check(file, "num_key_value_heads", kv_heads, heads % kv_heads == 0, f"a divisor of num_attention_heads={heads}")
    if getattr(hf_config, "head_dim", None) is None:  # derived as transformers does; set once for every reader
        hf_config.head_dim = hf_config.hidden_size // heads
    _check(file, "head_dim", hf_config.head_dim, _is_positive_int(hf_config.head_dim) and hf_config.head_dim % 2 == 0,
           "a positive even integer (hidden_size // num_attention_heads where unset)")
    eps = getattr(hf_config, "rms_norm_eps", None)
    _check(file, "rms_norm_eps", eps, _is_positive_number(eps), "a positive number")
    rope = rope_parameters(hf_config)
    _check(file, "rope_theta", rope.get("rope_theta"), _is_positive_number(rope.get("rope_theta")), "a positive number")
    rope_type = rope.get("rope_type", "default")
    _check(file, "rope_type", rope_type, rope_type in ROPE_TYPES,
           f"one of {ROPE_TYPES} (a 'dynamic' rope depends on the sequence length)")
    act = getattr(hf_config, "hidden_act", "silu")
    _check(file, "hidden_act", act, act == "silu", "'silu', the MLP activation nanovllm computes")
    sliding = getattr(hf_config, "use_sliding_window", False) or "sliding_attention" in (
        getattr(hf_config, "layer_types", None) or ())
    _check(file, "use_sliding_window", sliding, not sliding, "false: nanovllm's layers attend to the whole context")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _eos_token_ids(path: str, hf_config: PretrainedConfig) -> tuple[int, ...]:
    eos = _token_ids(hf_config.eos_token_id)
    if eos is None:
        raise ValueError(f"{path}/config.json: eos_token_id must be a token id or a list of token ids, "
                         f"got {hf_config.eos_token_id!r}")
    return _generation_eos_token_ids(path) or eos


def _generation_eos_token_ids(path: str) -> tuple[int, ...]:
    """The end-of-sequence tokens of generation_config.json; () where it is absent or unreadable."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return ()
    eos, problem = (), None
    try:
        value = GenerationConfig.from_pretrained(path).eos_token_id
        eos = _token_ids(value)
        if eos is None:
            problem = f"eos_token_id {value!r} is not a token id or a list of token ids"
    except (OSError, ValueError, TypeError) as e:
        problem = str(e)
    if problem:
        logger.warning("ignoring %s (%s): end-of-sequence tokens come from config.json only", file, problem)
        return ()
    return eos


def _token_ids(value) -> tuple[int, ...] | None:
    """A token id or a list of them (or None, for none) as a tuple; None where value is neither."""
    ids = () if value is None else tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return ids if all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids) else None
