from nanovllm.disagg import PDEngine
from nanovllm.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """The engine the options ask for: this sequential engine, or with enable_two_gpu_pd=True a
    prefill/decode engine (a nanovllm.disagg.PDEngine), which offers the same API."""

    def __new__(cls, model, *args, **options):
        if options.get("enable_two_gpu_pd") is True:
            return PDEngine(model, *args, **options)
        return super().__new__(cls)
