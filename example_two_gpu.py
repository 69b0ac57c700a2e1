"""Prefill/decode disaggregation: a prefill runner on one GPU, a decode runner on another, the KV of
each finished prefill copied across while both keep working. With one GPU (or none) both runners
share the device (same-device mode).

python example_two_gpu.py [CHECKPOINT_DIR]
"""
import sys

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.tools.make_model import default_model


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else default_model()
    decode_device_id = 1 if torch.cuda.device_count() >= 2 else 0
    if decode_device_id == 0:
        where = "one GPU" if torch.cuda.is_available() else "no GPU"
        print(f"[example] {where} here: running same-device mode, both runners on one device")
    llm = LLM(str(path), enable_two_gpu_pd=True, prefill_device_id=0, decode_device_id=decode_device_id)
    prompts = ["Hello, how are you?", "What is AI?", "list all prime numbers within 100"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.7, max_tokens=64))
    for prompt, output in zip(prompts, outputs):
        print(f"Prompt: {prompt!r}")
        print(f"Output: {output['text']!r}\n")
    llm.print_pd_statistics()


if __name__ == "__main__":
    main()
