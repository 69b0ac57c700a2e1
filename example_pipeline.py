"""The attention/FFN decode pipeline: enable it, generate as usual, read its statistics.

python example_pipeline.py [CHECKPOINT_DIR]
"""
import sys

from nanovllm import LLM, SamplingParams
from nanovllm.tools.make_model import default_model


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else default_model()
    llm = LLM(
        str(path),
        enable_pipeline=True,
        pipeline_attention_sm_count=16,
        pipeline_ffn_sm_count=16,
        pipeline_enable_profiling=True,
    )
    sampling_params = SamplingParams(temperature=0.7, max_tokens=100)
    prompts = ["Hello, how are you?", "What is AI?"]
    outputs = llm.generate(prompts, sampling_params)
    for prompt, output in zip(prompts, outputs):
        print(f"Prompt: {prompt}")
        print(f"Output: {output['text']}\n")
    llm.model_runner.print_pipeline_statistics()


if __name__ == "__main__":
    main()
