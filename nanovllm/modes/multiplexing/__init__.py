"""Prefill/decode multiplexing on one GPU (enable_pd_multiplexing): the disaggregation loop with both
runners on one device sharing the weights and one KV cache, prefills and decode steps placed on SM
partitions of the GPU (green contexts) while they run side by side. See docs/modes.md."""
import time

from nanovllm.config import Config
from nanovllm.engine.decode_paths import DecodeExtension
from nanovllm.engine.model_runner import ModelRunner, RunnerRole
from nanovllm.engine.scheduler import Scheduler
from nanovllm.modes.disaggregation import DECODE_PRIORITY, PREFILL_PRIORITY
from nanovllm.modes.disaggregation.loop import PDLoop
from nanovllm.modes.disaggregation.scheduler import PDScheduler
from nanovllm.modes.disaggregation.stats import PDStatistics
from nanovllm.modes.multiplexing.placement import SplitPlacement
from nanovllm.modes.multiplexing.splits import prepare_splits
from nanovllm.partitions.green import GreenContextUnavailable
from nanovllm.utils.log import get_logger

logger = get_logger("PD-mux")


def build_loop(config: Config, tokenizer, decode_extensions: tuple[DecodeExtension, ...] = ()) -> PDLoop:
    """decode_extensions serve the decode runner's steps on the whole GPU; on a split's lane it replays the
    sequential forward."""
    device = config.device
    try:
        splits = prepare_splits(device)
        partitions = "green-context partitions"
    except GreenContextUnavailable as e:
        splits, partitions = [], f"one stream ({e.reason})"
        logger.info("green contexts unavailable (%s): prefill and decode run one after the other on one stream",
                    e.reason)
    prefill = ModelRunner(config, device, role=RunnerRole(graphs=("prefill",), stream_priority=PREFILL_PRIORITY))
    decode = ModelRunner(config, device, role=RunnerRole(graphs=("decode",), stream_priority=DECODE_PRIORITY,
                                                         shares=prefill, shares_kv_cache=True,
                                                         decode_extensions=decode_extensions))
    if not splits:
        prefill.stream = decode.stream
    start = time.perf_counter()
    for split in splits:
        prefill.capture_lane(split.prefill)
        decode.capture_lane(split.decode)
    if splits and not config.runner.enforce_eager:
        logger.info("captured the graphs again for %d splits (decode %s SMs) in %.1f s", len(splits),
                    ", ".join(str(s.decode.num_sms) for s in splits), time.perf_counter() - start)
    scheduler = PDScheduler(Scheduler(config, decode.kv_cache.num_blocks, tokenizer), None)
    placement = SplitPlacement(splits, partitions, config.mux.pd_max_itl_ms, config.mux.pd_max_ttft_ms)
    placement.choose(prefill, decode)
    logger.info("prefill and decode share %d KV blocks of %d tokens on %s; %s", decode.kv_cache.num_blocks,
                decode.block_size, device, "CUDA graphs" if decode.decode_paths.graphs is not None else "eager")
    stats = PDStatistics(device, device, "none (one KV cache shared by both runners)")
    return PDLoop(config, prefill, decode, scheduler, None, placement, stats)
