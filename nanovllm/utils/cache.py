import os
from pathlib import Path


def cache_root() -> Path:
    """Where nanovllm keeps what it builds or measures once: $NANOVLLM_CACHE, default ~/.cache/nanovllm."""
    return Path(os.environ.get("NANOVLLM_CACHE", "~/.cache/nanovllm")).expanduser()
