"""Greedy tokens of every mode on fixed prompts, in float32, as JSON: run it against two versions of the
engine (PYTHONPATH picks the checkout) and compare the files token by token.

python -m benchmarks.mode_tokens --out tokens.json [--model DIR]
"""
import argparse
import json
from random import Random

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.tools.make_model import ensure_model

MODES = {
    "graph": {},
    "graph-sync": {"async_scheduling": False},
    "eager": {"enforce_eager": True},
    "pipeline-forced": {"enable_pipeline": True, "pipeline_force": True},
    "two-gpu-same-device": {"enable_two_gpu_pd": True, "prefill_device_id": 0, "decode_device_id": 0},
    "pd-mux": {"enable_pd_multiplexing": True},
    "fp8-kv": {"kv_cache_dtype": "fp8_e4m3"},
}


def prompts(vocab_size: int) -> list[list[int]]:
    """Mixed lengths, and prompts that share a prefix of full blocks with an earlier one (prefix-cache hits)."""
    rng = Random(0)
    base = [[rng.randrange(min(vocab_size, 10000)) for _ in range(n)] for n in (3, 17, 300, 120, 700, 45, 7, 999)]
    return base + [base[2][:256] + [5, 6, 7], base[4][:512] + base[1], base[7] + [9]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the tiny random-weight preset)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = args.model or str(ensure_model("tiny"))
    greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    tokens = {}
    for mode, options in MODES.items():
        llm = LLM(model, dtype="float32", max_model_len=2048, max_num_seqs=64, gpu_memory_utilization=0.5,
                  **options)
        batch = prompts(llm.config.hf_config.vocab_size)
        # Twice: the second time with prefix-cache hits.
        tokens[mode] = [[o["token_ids"] for o in llm.generate(batch, greedy, use_tqdm=False)] for _ in range(2)]
        llm.exit()
        del llm
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(tokens, f)


if __name__ == "__main__":
    main()
