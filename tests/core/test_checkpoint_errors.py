"""A broken checkpoint fails at load with a ValueError that names the file and the tensor or field."""
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.layers.embed_head import VocabParallelEmbedding
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tests.helpers import BLOCK_SIZE, VOCAB_SIZE, build_checkpoint, logged, random_prompts

WEIGHTS = "model.safetensors"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
K_PROJ = "model.layers.0.self_attn.k_proj.weight"
GATE_PROJ = "model.layers.0.mlp.gate_proj.weight"
UP_PROJ = "model.layers.0.mlp.up_proj.weight"
DOWN_PROJ = "model.layers.0.mlp.down_proj.weight"
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"


@pytest.fixture(scope="module")
def valid_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen3_valid")
    build_checkpoint(path, seed=5, tie_word_embeddings=False, num_hidden_layers=1)
    return path


@pytest.fixture
def broken_dir(valid_dir, tmp_path) -> Path:
    """A copy of the valid checkpoint for a test to break."""
    return Path(shutil.copytree(valid_dir, tmp_path / "model"))


def load(path: Path, **options) -> LLM:
    return LLM(str(path), device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=40, **options)


def assert_load_fails(path: Path, *names: str) -> str:
    with pytest.raises(ValueError) as info:
        load(path)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in: {message}"
    return message


def edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def edit_config(path: Path, edit, file: str = "config.json") -> None:
    config = json.loads((path / file).read_text())
    edit(config)
    (path / file).write_text(json.dumps(config))


@pytest.mark.parametrize("name", [Q_PROJ, K_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ, EMBED, NORM, "lm_head.weight"])
def test_missing_tensor(broken_dir, name):
    edit_weights(broken_dir, lambda t: t.pop(name))
    assert_load_fails(broken_dir, WEIGHTS, name, "missing")


@pytest.mark.parametrize("name, change, expected, got", [
    (K_PROJ, lambda w: torch.cat([w, w[:1]]), (32, 64), (33, 64)),  # an extra row
    (Q_PROJ, lambda w: w[:32], (64, 64), (32, 64)),  # short
    (UP_PROJ, lambda w: w[:, :32], (128, 64), (128, 32)),
    (DOWN_PROJ, lambda w: w.t(), (64, 128), (128, 64)),  # transposed
    (NORM, lambda w: w[:1], (64,), (1,)),
    ("model.layers.0.self_attn.q_norm.weight", lambda w: w[None], (16,), (1, 16)),
    (EMBED, lambda w: w[:VOCAB_SIZE - 12], (VOCAB_SIZE, 64), (VOCAB_SIZE - 12, 64)),
    ("lm_head.weight", lambda w: torch.cat([w, w[:4]]), (VOCAB_SIZE, 64), (VOCAB_SIZE + 4, 64)),
])
def test_wrong_shape(broken_dir, name, change, expected, got):
    edit_weights(broken_dir, lambda t: t.update({name: change(t[name]).contiguous()}))
    assert_load_fails(broken_dir, WEIGHTS, name, f"expected shape {expected}", f"got {got}")


def test_vocab_size_disagrees_with_weights(broken_dir):
    edit_config(broken_dir, lambda c: c.update(vocab_size=VOCAB_SIZE + 64))
    message = assert_load_fails(broken_dir, WEIGHTS, "config.json", str((VOCAB_SIZE + 64, 64)), str((VOCAB_SIZE, 64)))
    assert EMBED in message or "lm_head.weight" in message  # whichever of the two the file holds first


def test_integer_weight(broken_dir):
    edit_weights(broken_dir, lambda t: t.update({NORM: t[NORM].to(torch.int32)}))
    assert_load_fails(broken_dir, WEIGHTS, NORM, "torch.int32")


def test_unexpected_tensor(broken_dir):
    extra = "model.layers.1.mlp.up_proj.weight"  # the checkpoint has one layer
    edit_weights(broken_dir, lambda t: t.update({extra: t[UP_PROJ].clone()}))
    assert_load_fails(broken_dir, WEIGHTS, extra, "unexpected")


def test_tensor_in_two_files(broken_dir):
    tensors = load_file(broken_dir / WEIGHTS)
    save_file({Q_PROJ: tensors[Q_PROJ]}, broken_dir / "model-extra.safetensors", metadata={"format": "pt"})
    assert_load_fails(broken_dir, "model-extra.safetensors", WEIGHTS, Q_PROJ)


@pytest.mark.parametrize("corrupt", [
    lambda data: data[:len(data) // 2],  # truncated
    lambda data: data[:5],
    lambda data: b"\xff" * 8 + data[8:],  # header length garbage
    lambda data: data[:8] + b"[" + data[9:],  # header not a JSON object
])
def test_unreadable_weights_file(broken_dir, corrupt):
    file = broken_dir / WEIGHTS
    file.write_bytes(corrupt(file.read_bytes()))
    assert_load_fails(broken_dir, f"cannot read {file}")


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                                   "num_hidden_layers", "vocab_size"])
def test_config_without_size_field(broken_dir, field):
    edit_config(broken_dir, lambda c: c.pop(field))
    assert_load_fails(broken_dir, "config.json", field)


@pytest.mark.parametrize("field, value", [
    ("num_attention_heads", 0), ("hidden_size", -64), ("num_hidden_layers", 0), ("vocab_size", 0),
    ("intermediate_size", 0), ("max_position_embeddings", 0), ("num_key_value_heads", 3), ("head_dim", 0),
    ("head_dim", 15), ("rms_norm_eps", 0.0), ("rms_norm_eps", -1e-6), ("hidden_size", "64"), ("head_dim", 16.0),
    ("num_hidden_layers", -4),
])
def test_invalid_config_field(broken_dir, field, value):
    edit_config(broken_dir, lambda c: c.update({field: value}))
    assert_load_fails(broken_dir, "config.json", field)


@pytest.mark.parametrize("field, value", [
    ("rope_theta", -1.0), ("rope_theta", 0), ("rope_theta", "abc"), ("rope_type", "dynamic"), ("rope_type", "magic"),
])
def test_invalid_rope_parameter(broken_dir, field, value):
    edit_config(broken_dir, lambda c: c["rope_parameters"].update({field: value}))
    assert_load_fails(broken_dir, "config.json", field)


@pytest.mark.parametrize("fields, named", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(use_sliding_window=True, sliding_window=8), "use_sliding_window"),
    (dict(layer_types=["sliding_attention"], sliding_window=8), "use_sliding_window"),
])
def test_model_the_layers_do_not_compute(broken_dir, fields, named):
    edit_config(broken_dir, lambda c: c.update(fields))
    assert_load_fails(broken_dir, "config.json", named)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight(broken_dir, value):
    def damage(tensors):
        tensors[K_PROJ][3, 5] = value
    edit_weights(broken_dir, damage)
    assert_load_fails(broken_dir, str(broken_dir / WEIGHTS), K_PROJ, "NaN or infinite")


def test_damaged_bytes_in_a_weights_file(broken_dir):
    """0xFF bytes over a float32 tensor's data are NaNs: the file still parses, the tensor is broken."""
    file = broken_dir / WEIGHTS
    data = bytearray(file.read_bytes())
    data[-4096:] = b"\xff" * 4096  # the data of the file's last tensors
    file.write_bytes(bytes(data))
    message = assert_load_fails(broken_dir, str(file), "NaN or infinite")
    broken = re.search(r"tensor '([^']+)'", message).group(1)
    assert not torch.isfinite(load_file(file)[broken]).all()


def test_weight_past_the_range_of_the_model_dtype(broken_dir):
    def enlarge(tensors):
        tensors[DOWN_PROJ][0, 0] = 1e30
    edit_weights(broken_dir, enlarge)
    load(broken_dir)  # finite in float32, the checkpoint's dtype
    with pytest.raises(ValueError, match=re.escape(f"{broken_dir / WEIGHTS}: tensor {DOWN_PROJ!r} holds values past "
                                                   "the range of float16")):
        load(broken_dir, dtype="float16")


def test_invalid_tokenizer(broken_dir):
    (broken_dir / "tokenizer.json").write_text("{not json")
    assert_load_fails(broken_dir, "tokenizer.json", str(broken_dir))


def test_tokenizer_without_its_vocabulary(broken_dir):
    """transformers loads a Qwen2 tokenizer from its tokenizer_config.json alone, with the added tokens only."""
    (broken_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {"0": {"content": "<|endoftext|>", "special": True, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False}}}))
    assert_load_fails(broken_dir, "tokenizer_config.json", str(broken_dir), "encode no text")


@pytest.mark.parametrize("content", ["{not json", '{"eos_token_id": "</s>"}'])
def test_invalid_generation_config_warns_once(broken_dir, caplog, content):
    edit_config(broken_dir, lambda c: c.update(eos_token_id=7))
    (broken_dir / "generation_config.json").write_text(content)
    llm = load(broken_dir)
    assert llm.config.eos_token_ids == (7,)  # from config.json
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    warnings = [m for m in logged(caplog, "Config", logging.WARNING) if "generation_config.json" in m]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"ignoring {broken_dir / 'generation_config.json'} (")
    assert warnings[0].endswith("): end-of-sequence tokens come from config.json only")


def test_kv_cache_too_small_suggests_num_kvcache_blocks(valid_dir):
    with pytest.raises(ValueError, match=re.escape("raise num_kvcache_blocks to at least 8")) as info:
        LLM(str(valid_dir), device="cpu", kvcache_block_size=BLOCK_SIZE, num_kvcache_blocks=4, max_model_len=128)
    assert "gpu_memory_utilization" not in str(info.value)


def test_sharded_half_precision_checkpoint_loads_exactly(valid_dir, broken_dir):
    """Tensors spread over two files and stored as float16 are cast, each landing in its own rows."""
    tensors = {k: v.half() for k, v in load_file(broken_dir / WEIGHTS).items()}
    names = sorted(tensors)
    (broken_dir / WEIGHTS).unlink()
    for i, part in enumerate((names[::2], names[1::2])):
        save_file({k: tensors[k] for k in part}, broken_dir / f"model-{i}.safetensors", metadata={"format": "pt"})
    params = dict(load(broken_dir).model_runner.model.named_parameters())
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    packed = {
        attn + "qkv_proj.weight": [attn + f"{s}_proj.weight" for s in "qkv"],
        mlp + "gate_up_proj.weight": [GATE_PROJ, UP_PROJ],
    }
    assert set(params) == (set(tensors) - {n for parts in packed.values() for n in parts}) | set(packed)
    for name, param in params.items():
        expected = torch.cat([tensors[n] for n in packed[name]]) if name in packed else tensors[name]
        assert param.dtype == torch.float32
        torch.testing.assert_close(param, expected.float(), rtol=0, atol=0)
    prompts = random_prompts([5, 20], seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    assert all(len(out["token_ids"]) == 4 for out in load(broken_dir).generate(prompts, greedy, use_tqdm=False))


@pytest.mark.parametrize("rank", [0, 1])
def test_each_tensor_parallel_rank_checks_the_full_shape(monkeypatch, rank):
    """Under tensor parallelism each rank checks the whole checkpoint tensor, then keeps its own shard."""
    for module in ("linear", "embed_head"):
        monkeypatch.setattr(f"nanovllm.layers.{module}.tp_size", lambda: 2)
        monkeypatch.setattr(f"nanovllm.layers.{module}.tp_rank", lambda: rank)
    qkv = QKVParallelLinear(hidden_size=8, head_dim=2, num_heads=4, num_kv_heads=2)
    q, k, v = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    for shard_id, weight in zip("qkv", (q, k, v)):
        qkv.weight.weight_loader(qkv.weight, weight, shard_id)
    rows = lambda w: w.chunk(2)[rank]
    assert torch.equal(qkv.weight, torch.cat([rows(q), rows(k), rows(v)]))
    with pytest.raises(ValueError, match=re.escape("expected shape (4, 8) from config.json, got (2, 8)")):
        qkv.weight.weight_loader(qkv.weight, rows(k), "k")  # one rank's share is not the whole tensor

    gate_up = MergedColumnParallelLinear(8, [6, 6])
    with pytest.raises(ValueError, match=re.escape("expected shape (6, 8) from config.json, got (7, 8)")):
        gate_up.weight.weight_loader(gate_up.weight, torch.randn(7, 8), 1)

    down = RowParallelLinear(6, 8)
    weight = torch.randn(8, 6)
    down.weight.weight_loader(down.weight, weight)
    assert torch.equal(down.weight, weight.chunk(2, dim=1)[rank])
    with pytest.raises(ValueError, match=re.escape("expected shape (8, 6) from config.json, got (8, 3)")):
        down.weight.weight_loader(down.weight, weight[:, :3])

    embed = VocabParallelEmbedding(5, 4)  # three rows per rank; rank 1 has one row of padding
    weight = torch.randn(5, 4)
    embed.weight.weight_loader(embed.weight, weight)
    assert torch.equal(embed.weight, [weight[:3], torch.cat([weight[3:], torch.zeros(1, 4)])][rank])
    with pytest.raises(ValueError, match=re.escape("expected shape (5, 4) from config.json, got (3, 4)")):
        embed.weight.weight_loader(embed.weight, weight[:3])
