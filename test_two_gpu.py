"""Two-GPU prefill/decode disaggregation is not available yet: the option must be rejected clearly."""
import pytest

from nanovllm import LLM
from tests.helpers import build_checkpoint


def test_two_gpu_mode_is_rejected_with_a_clear_error(tmp_path):
    build_checkpoint(tmp_path, seed=0, tie_word_embeddings=True, num_hidden_layers=1)
    with pytest.raises(ValueError, match="enable_two_gpu_pd"):
        LLM(str(tmp_path), device="cpu", enable_two_gpu_pd=True)
