import sys
import time

from nanovllm import LLM, SamplingParams
from nanovllm.tools.make_model import default_model


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else default_model()
    llm = LLM(str(path))

    sampling_params = SamplingParams(temperature=0.6, max_tokens=64)
    prompts = [
        "introduce yourself",
        "list all prime numbers within 100",
        "write a haiku about the sea",
    ]
    prompts = [
        llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True)
        for prompt in prompts
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling_params)
    elapsed = time.perf_counter() - start

    for prompt, output in zip(prompts, outputs):
        print(f"\nPrompt: {prompt!r}")
        print(f"Completion: {output['text']!r}")
    num_tokens = sum(len(output["token_ids"]) for output in outputs)
    print(f"\n{num_tokens} tokens in {elapsed:.2f}s: {num_tokens / elapsed:.1f} tokens/s")


if __name__ == "__main__":
    main()
