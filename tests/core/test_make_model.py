"""The model maker (nanovllm/tools/make_model.py): random-weight checkpoints with Qwen's tokenizer that load
in transformers."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen3ForCausalLM

from nanovllm.tools import make_model as mm
from tests.helpers import logged

pytestmark = pytest.mark.slow  # the tiny preset's checkpoint and Qwen's 151k-token tokenizer, written several times


def weights(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_tiny_loads_in_transformers(tiny_preset):
    config = json.loads((tiny_preset / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    model, info = Qwen3ForCausalLM.from_pretrained(tiny_preset, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    for name, tensor in weights(tiny_preset).items():
        assert torch.equal(state[name], tensor), name
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # tied


def test_tiny_logits_are_peaked_and_depend_on_context(tiny_preset):
    model = Qwen3ForCausalLM.from_pretrained(tiny_preset, dtype=torch.float32).eval()
    ids = torch.randint(0, 150000, (1, 48), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, 0] += 1
    with torch.no_grad():
        logits, other_logits = model(ids).logits[0], model(other).logits[0]
    assert 4 < logits.std(-1).mean() < 16
    assert logits.softmax(-1).max(-1).values.mean() > 0.3
    assert (logits.argmax(-1) != other_logits.argmax(-1)).float().mean() > 0.3
    greedy = model.generate(ids, max_new_tokens=16, do_sample=False)[0, 48:]
    assert len(set(greedy.tolist())) > 4


def test_tokenizer_round_trip(tiny_preset):
    tok = AutoTokenizer.from_pretrained(tiny_preset)
    text = "Hello, world! 你好 café\n\tdef f(x):\n        return x ** 2  "
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges, not bytes
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert tok(chat).input_ids[0] == 151644  # <|im_start|>
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tok.eos_token_id == 151645
    assert len(tok) <= json.loads((tiny_preset / "config.json").read_text())["vocab_size"]
    generation = json.loads((tiny_preset / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]


def test_seed_determines_weights(tiny_preset, tmp_path):
    same = weights(mm.make_model("tiny", tmp_path / "same", seed=0))
    other = weights(mm.make_model("tiny", tmp_path / "other", seed=1))
    base = weights(tiny_preset)
    assert all(torch.equal(base[name], same[name]) for name in base)
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"],
                           other["model.layers.0.self_attn.q_proj.weight"])


def test_sharded_checkpoint(tiny_preset, tmp_path, monkeypatch):
    monkeypatch.setattr(mm, "MAX_SHARD_BYTES", 16 << 20)
    path = mm.make_model("tiny", tmp_path, seed=0)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in path.glob("*.safetensors")) == files
    sharded, base = weights(path), weights(tiny_preset)
    assert sharded.keys() == base.keys() and all(torch.equal(sharded[n], base[n]) for n in base)
    _, info = Qwen3ForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_bfloat16_matches_float32_draw(tiny_preset, tmp_path):
    bf16 = weights(mm.make_model("tiny", tmp_path, seed=0, dtype=torch.bfloat16))
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, tensor in weights(tiny_preset).items():
        assert bf16[name].dtype == torch.bfloat16 and torch.equal(bf16[name], tensor.to(torch.bfloat16)), name


def test_real_shapes():
    for preset, params, untied in [("qwen3-0.6b", 596_049_920, False), ("qwen3-8b", 8_190_735_360, True)]:
        specs = mm.weight_specs(mm.hf_config(preset, "bfloat16"))
        assert sum(torch.Size(shape).numel() for _, shape, _ in specs) == params
        assert any(name == "lm_head.weight" for name, _, _ in specs) == untied
    shards = mm.plan_shards(mm.weight_specs(mm.hf_config("qwen3-8b", "bfloat16")), 2)
    assert len(shards) == 4
    assert all(sum(torch.Size(s).numel() * 2 for _, s, _ in shard) <= mm.MAX_SHARD_BYTES for shard in shards)


def test_ensure_model_builds_once_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    path = mm.ensure_model("tiny")
    assert path == tmp_path / "models" / "tiny-seed0" == mm.default_model_dir("tiny")
    [said] = logged(caplog, "make_model")
    assert "'tiny' preset" in said and str(path) in said and "GiB" in said
    caplog.clear()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert mm.ensure_model("tiny") == path
    assert not [r for r in caplog.records if r.name.startswith("nanovllm")]
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-seed0"]


def test_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["make_model", "--preset", "tiny", "--out", str(tmp_path), "--seed", "3"])
    mm.main()
    assert capsys.readouterr().out.strip() == str(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "model.safetensors").is_file()


def test_the_default_model_says_its_weights_are_random(tmp_path, monkeypatch, caplog):
    """What the examples run without a checkpoint: the default preset, with one line saying why its text is
    gibberish and how to pass a real checkpoint."""
    monkeypatch.setattr(mm, "ensure_model", lambda preset: tmp_path / preset)
    assert mm.default_model() == tmp_path / mm.default_preset()
    [said] = logged(caplog, "make_model")
    assert "random weights" in said and "Hugging Face Qwen3 checkpoint directory" in said
