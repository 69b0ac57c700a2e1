"""Prefill/decode disaggregation (enable_two_gpu_pd): a prefill runner and a decode runner kept busy at
once, with the KV of finished prefills handed over asynchronously. See docs/modes.md."""
import torch

from nanovllm.config import Config
from nanovllm.engine.decode_paths import DecodeExtension
from nanovllm.engine.model_runner import ModelRunner, RunnerRole
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.block_manager import BlockManager
from nanovllm.modes.disaggregation.kv_transfer import KVTransfer
from nanovllm.modes.disaggregation.loop import PDLoop, RunnerStreams
from nanovllm.modes.disaggregation.scheduler import PDScheduler
from nanovllm.modes.disaggregation.stats import PDStatistics
from nanovllm.utils.log import get_logger

logger = get_logger("PD")
# A graph replay takes the priority of the stream it is launched on: on a shared device, decode kernels
# get SMs ahead of prefill kernels as blocks retire.
DECODE_PRIORITY, PREFILL_PRIORITY = -1, 0


def devices(config: Config) -> tuple[torch.device, torch.device]:
    """The prefill runner's device and the decode runner's; on CPU both are the CPU."""
    if config.device.type == "cpu":
        return config.device, config.device
    return torch.device("cuda", config.pd.prefill_device_id), torch.device("cuda", config.pd.decode_device_id)


def prefill_cache_blocks(config: Config, same_device: bool) -> tuple[int, str]:
    """The prefill cache's blocks and the option they follow from. The cache holds the prompts in flight
    and the prefix cache. On a GPU of its own it takes the rest of that GPU (-1: sized from memory), all
    of it useful as prefix cache. Sharing a device, it has room for two full prefill batches (one
    computing while the previous one's KV is copied out), each at least one longest prompt, and the
    decode cache gets the rest."""
    if config.pd.prefill_num_kvcache_blocks != -1:
        return config.pd.prefill_num_kvcache_blocks, "prefill_num_kvcache_blocks"
    if not same_device:
        return -1, "prefill_num_kvcache_blocks"
    scheduler = config.scheduler
    longest, option = max((scheduler.max_num_batched_tokens, "max_num_batched_tokens"),
                          (scheduler.max_model_len, "max_model_len"))
    return 2 * -(-longest // config.cache.kvcache_block_size), option


def build_loop(config: Config, tokenizer, decode_extensions: tuple[DecodeExtension, ...] = ()) -> PDLoop:
    """The prefill runner first, with its cache sized for its role; then the decode runner, which sizes its
    cache from what is left on its device (or takes num_kvcache_blocks) and, on the same device, shares the
    prefill runner's weights. Each captures the graphs of its role only."""
    prefill_device, decode_device = devices(config)
    same = prefill_device == decode_device
    blocks, option = prefill_cache_blocks(config, same)
    prefill = ModelRunner(config, prefill_device, role=RunnerRole(
        graphs=("prefill",), num_kvcache_blocks=blocks, cache_size_option=option, stream_priority=PREFILL_PRIORITY))
    decode = ModelRunner(config, decode_device, role=RunnerRole(
        graphs=("decode",), stream_priority=DECODE_PRIORITY, shares=prefill, decode_extensions=decode_extensions))
    scheduler = PDScheduler(Scheduler(config, decode.kv_cache.num_blocks, tokenizer),
                            BlockManager(prefill.kv_cache.num_blocks, config.cache.kvcache_block_size))
    transfer = KVTransfer(prefill.kv_cache.tensor, decode.kv_cache.tensor)
    where = " (same-device mode)" if same else ""
    for runner, role, duty in ((prefill, "prefill", "prompts in flight and the prefix cache"),
                               (decode, "decode", "decoding sequences")):
        captured = runner.prefill_graphs if role == "prefill" else runner.decode_paths.graphs
        logger.info("%s runner on %s%s: %d KV blocks of %d tokens for %s; %s", role, runner.device, where,
                    runner.kv_cache.num_blocks, runner.block_size, duty,
                    "CUDA graphs" if captured is not None else "eager")
    logger.info("KV handoff: %s block copies on a copy stream", transfer.mode)
    stats = PDStatistics(prefill_device, decode_device, transfer.mode)
    return PDLoop(config, prefill, decode, scheduler, transfer, RunnerStreams(), stats)
