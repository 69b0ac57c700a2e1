import os
from glob import glob

import torch
from safetensors import safe_open
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor):
    param.data.copy_(loaded_weight)


def load_model(model: nn.Module, path: str) -> None:
    """Loads Hugging Face safetensors weights, routing q/k/v and gate/up into their packed params."""
    files = sorted(glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"model directory {path!r} has no *.safetensors weight files")
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters())  # a tied lm_head appears once, as the embedding
    loaded = set()
    for file in files:
        with safe_open(file, "pt", "cpu") as f:
            for name in f.keys():
                for short, (target, shard_id) in packed.items():
                    if f".{short}." in name:
                        param_name = name.replace(short, target)
                        params[param_name].weight_loader(params[param_name], f.get_tensor(name), shard_id)
                        break
                else:
                    if name not in params:
                        if name == "lm_head.weight":
                            continue
                        raise ValueError(f"unexpected weight {name!r} in {file}")
                    param_name = name
                    getattr(params[name], "weight_loader", default_weight_loader)(params[name], f.get_tensor(name))
                loaded.add(param_name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"weights missing from {path}: {missing[:5]}")
