"""Prefill/decode disaggregation: a prefill runner and a decode runner kept busy at once, with the KV of
finished prefills handed over asynchronously. See docs/architecture.md."""
from nanovllm.disagg.engine import PDEngine
from nanovllm.disagg.multiplex import MuxEngine

__all__ = ["MuxEngine", "PDEngine"]
