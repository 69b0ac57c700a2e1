from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.modes import build_loop
from nanovllm.modes.disaggregation.stats import report


class LLM(LLMEngine):
    """The user's entry point: the engine with the step loop and decode paths the options ask for
    (sequential, enable_pipeline, enable_two_gpu_pd, enable_pd_multiplexing); every mode offers the same API."""

    def build_loop(self, config, tokenizer):
        return build_loop(config, tokenizer)

    def get_pd_statistics(self) -> dict:
        """The seed's view of statistics()["pd"]: {} outside the prefill/decode modes."""
        return self.statistics().get("pd", {})

    def print_pd_statistics(self) -> None:
        stats = self.get_pd_statistics()
        print(report(stats) if stats else "[PD Statistics]\n  Prefill/decode disaggregation is off")
