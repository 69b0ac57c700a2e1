from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.modes import build_loop


class LLM(LLMEngine):
    """The user's entry point: the engine with the step loop and decode paths the options ask for
    (sequential, enable_pipeline, enable_two_gpu_pd, enable_pd_multiplexing); every mode offers the same API."""

    def build_loop(self, config, tokenizer):
        return build_loop(config, tokenizer)

    def get_pd_statistics(self) -> dict:
        """statistics()["pd"] on its own, as the prefill/decode modes' API offers it: {} outside those modes."""
        return self.statistics().get("pd", {})

    def print_pd_statistics(self) -> None:
        off = "[PD Statistics]\n  Prefill/decode disaggregation is off"
        print(self.loop.report() if self.get_pd_statistics() else off)
