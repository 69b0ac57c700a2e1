from nanovllm.disagg import MuxEngine, PDEngine
from nanovllm.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """The engine the options ask for: this sequential engine, with enable_two_gpu_pd=True a
    prefill/decode engine (a nanovllm.disagg.PDEngine), or with enable_pd_multiplexing=True one that runs
    prefill and decode at once on SM partitions of one GPU (a nanovllm.disagg.MuxEngine); all offer the
    same API."""

    def __new__(cls, model, *args, **options):
        if options.get("enable_pd_multiplexing") is True:
            return MuxEngine(model, *args, **options)
        if options.get("enable_two_gpu_pd") is True:
            return PDEngine(model, *args, **options)
        return super().__new__(cls)
