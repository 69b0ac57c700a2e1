import os
from glob import glob

import torch
from safetensors import SafetensorError, safe_open
from torch import nn


def check_shape(loaded_weight: torch.Tensor, expected) -> None:
    """A checkpoint tensor must have exactly the full (unsharded) shape that config.json implies."""
    if tuple(loaded_weight.shape) != tuple(expected):
        raise ValueError(f"expected shape {tuple(expected)} from config.json, got {tuple(loaded_weight.shape)}")


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor):
    check_shape(loaded_weight, param.shape)
    param.data.copy_(loaded_weight)


def checkpoint_names(model: nn.Module) -> dict[str, tuple[str, object]]:
    """Maps each tensor name a Hugging Face checkpoint must hold to (parameter name, shard id or None).

    A packed parameter, such as qkv_proj, is loaded from one tensor per shard (q_proj, k_proj, v_proj).
    """
    shards = {}
    for name, (target, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        shards.setdefault(target, []).append((name, shard_id))
    names = {}
    for param_name, _ in model.named_parameters():  # a tied lm_head appears once, as the embedding
        module_path, _, leaf = param_name.rpartition(".")
        parent, _, module = module_path.rpartition(".")
        if module not in shards:
            names[param_name] = (param_name, None)
        for name, shard_id in shards.get(module, []):
            names[f"{parent}.{name}.{leaf}"] = (param_name, shard_id)
    return names


def load_model(model: nn.Module, path: str) -> None:
    """Loads Hugging Face safetensors weights, routing q/k/v and gate/up into their packed params.

    Every parameter, and every shard of a packed one, is loaded from exactly one tensor of exactly its
    expected shape, and holds finite values only; anything else is a ValueError that names the file and
    the tensor.
    """
    files = sorted(glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"model directory {path!r} has no *.safetensors weight files")
    params = dict(model.named_parameters())
    targets = checkpoint_names(model)
    loaded = {}  # tensor name -> the file it came from
    for file in files:
        try:
            with safe_open(file, "pt", "cpu") as f:
                for name in f.keys():
                    if name == "lm_head.weight" and name not in targets:
                        continue  # the output projection is tied to the embedding
                    if name not in targets:
                        raise ValueError(f"{file}: unexpected tensor {name!r}: this model has no such parameter")
                    if name in loaded:
                        raise ValueError(f"{file}: tensor {name!r} appears again; it was loaded from {loaded[name]}")
                    param_name, shard_id = targets[name]
                    try:
                        _load_tensor(params[param_name], shard_id, f.get_tensor(name))
                    except ValueError as e:
                        raise ValueError(f"{file}: tensor {name!r}: {e}") from None
                    loaded[name] = file
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {file}: {e}") from None
    missing = [name for name in targets if name not in loaded]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"tensor {missing[0]!r}{more} missing from {', '.join(files)}")
    _check_finite(params, targets, loaded)


def _check_finite(params: dict[str, nn.Parameter], targets: dict, loaded: dict[str, str]) -> None:
    """A NaN or infinite weight (damaged bytes, or a value past the range of the model's dtype) makes a
    broken checkpoint. The loaded parameters are read once where they are, with one synchronisation for
    all of them; only a failure opens the files again, to name the tensor."""
    finite = torch.stack([torch.isfinite(p).all() for p in params.values()]).tolist()
    for param_name, ok in zip(params, finite):
        if ok:
            continue
        dtype = params[param_name].dtype
        for name in (name for name, (target, _) in targets.items() if target == param_name):
            with safe_open(loaded[name], "pt", "cpu") as f:
                tensor = f.get_tensor(name)
            where = f"{loaded[name]}: tensor {name!r}"
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{where} holds NaN or infinite values: the checkpoint is broken")
            if not torch.isfinite(tensor.to(dtype)).all():
                raise ValueError(f"{where} holds values past the range of {str(dtype).removeprefix('torch.')}, the "
                                 "model's dtype: pass dtype='bfloat16' or 'float32'")


def _load_tensor(param: nn.Parameter, shard_id, loaded_weight: torch.Tensor) -> None:
    if not loaded_weight.is_floating_point():
        raise ValueError(f"dtype {loaded_weight.dtype} is not a floating-point weight")
    weight_loader = getattr(param, "weight_loader", default_weight_loader)
    if shard_id is None:
        weight_loader(param, loaded_weight)
    else:
        weight_loader(param, loaded_weight, shard_id)
