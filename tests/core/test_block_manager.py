"""BlockManager: chained hashing, reference counts of shared prefixes, reuse of freed cached blocks."""
from tests.helpers import check_consistent
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 16


def make_seq(token_ids) -> Sequence:
    return Sequence(list(token_ids), SamplingParams(temperature=0.0, max_tokens=8))


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What a prefill of the whole sequence does to the block manager."""
    seq.num_computed_tokens = seq.num_tokens
    bm.hash_computed_blocks(seq)


def test_hash_is_chained_over_the_prefix():
    a, b = list(range(BS)), list(range(100, 100 + BS))
    h_a = BlockManager.compute_hash(a)
    assert BlockManager.compute_hash(a) == h_a
    assert BlockManager.compute_hash(b) != h_a
    # The same block content after different prefixes must not collide.
    assert BlockManager.compute_hash(b, h_a) != BlockManager.compute_hash(b)
    assert BlockManager.compute_hash(b, h_a) != BlockManager.compute_hash(b, BlockManager.compute_hash(b))
    assert BlockManager.compute_hash(b, h_a) == BlockManager.compute_hash(b, BlockManager.compute_hash(a))


def test_same_block_after_different_prefix_is_not_a_hit():
    bm = BlockManager(16, BS)
    shared_second_block = list(range(500, 500 + BS))
    first = make_seq(list(range(BS)) + shared_second_block + [1])
    assert bm.allocate(first)
    compute_all(bm, first)
    other = make_seq(list(range(200, 200 + BS)) + shared_second_block + [1])
    assert bm.allocate(other)
    assert other.num_cached_tokens == 0
    assert not set(first.block_table) & set(other.block_table)
    check_consistent(bm, [first, other])


def test_allocate_and_deallocate_counts():
    bm = BlockManager(10, BS)
    seq = make_seq(range(40))
    assert bm.allocate(seq)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 7
    assert seq.num_cached_tokens == seq.num_computed_tokens == 0
    check_consistent(bm, [seq])
    bm.deallocate(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 10
    check_consistent(bm, [])


def test_shared_prefix_reference_counts():
    bm = BlockManager(12, BS)
    prefix = list(range(1000, 1000 + 2 * BS))
    first = make_seq(prefix + [1, 2, 3])
    assert bm.allocate(first)
    compute_all(bm, first)
    assert len(bm.hash_to_block_id) == 2  # the two full blocks; the partial third is not registered
    second = make_seq(prefix + [4, 5])
    third = make_seq(prefix[:BS] + [6] * 20)
    assert bm.allocate(second)
    assert bm.allocate(third)
    assert second.num_cached_tokens == second.num_computed_tokens == 2 * BS
    assert third.num_cached_tokens == BS
    assert second.block_table[:2] == first.block_table[:2]
    assert third.block_table[0] == first.block_table[0] and third.block_table[1] != first.block_table[1]
    assert bm.blocks[first.block_table[0]].ref_count == 3
    assert bm.blocks[first.block_table[1]].ref_count == 2
    assert bm.blocks[first.block_table[2]].ref_count == 1
    check_consistent(bm, [first, second, third])
    bm.deallocate(first)
    assert bm.blocks[second.block_table[0]].ref_count == 2
    assert bm.blocks[second.block_table[1]].ref_count == 1
    check_consistent(bm, [second, third])
    bm.deallocate(second)
    bm.deallocate(third)
    assert bm.num_free_blocks == 12
    check_consistent(bm, [])


def test_allocate_leaves_at_least_one_token_to_compute():
    bm = BlockManager(8, BS)
    prompt = list(range(2 * BS))  # exactly two full blocks
    first = make_seq(prompt)
    assert bm.allocate(first)
    compute_all(bm, first)
    again = make_seq(prompt)
    assert bm.allocate(again)
    # Both blocks are cached, but the last token must still be computed to produce logits.
    assert again.num_cached_tokens == BS
    assert again.num_computed_tokens < again.num_tokens
    longer = make_seq(prompt + [7])
    assert bm.allocate(longer)
    assert longer.num_cached_tokens == 2 * BS
    single = make_seq(prompt[:1])
    assert bm.allocate(single)
    assert single.num_cached_tokens == 0
    check_consistent(bm, [first, again, longer, single])


def test_freed_cached_blocks_are_reused_by_the_same_prefix():
    bm = BlockManager(6, BS)
    prompt = list(range(50, 50 + 3 * BS)) + [9]
    first = make_seq(prompt)
    assert bm.allocate(first)
    compute_all(bm, first)
    cached_blocks = first.block_table[:3]
    bm.deallocate(first)
    assert bm.num_free_blocks == 6
    assert all(bm.blocks[b].ref_count == 0 and bm.blocks[b].hash != -1 for b in cached_blocks)
    again = make_seq(prompt[:-1] + [10, 11])
    assert bm.allocate(again)
    assert again.block_table[:3] == cached_blocks
    assert again.num_cached_tokens == 3 * BS
    assert bm.num_free_blocks == 2
    check_consistent(bm, [again])


def test_allocate_counts_cached_free_blocks_as_used():
    bm = BlockManager(3, BS)
    first = make_seq(range(2 * BS + 1))
    assert bm.allocate(first)
    compute_all(bm, first)
    bm.deallocate(first)
    # 4 blocks needed: the hits come out of the free list, so they do not make room.
    too_big = make_seq(list(range(2 * BS)) + [1] * (2 * BS))
    assert not bm.allocate(too_big)
    assert too_big.block_table == [] and bm.num_free_blocks == 3 and too_big.num_cached_tokens == 0
    # 3 blocks, 2 of them cached hits lying in the free list: exactly fits.
    fits = make_seq(list(range(2 * BS)) + [1] * BS)
    assert bm.allocate(fits)
    assert bm.num_free_blocks == 0
    check_consistent(bm, [fits])


def test_oldest_freed_block_is_handed_out_first_and_loses_its_hash():
    bm = BlockManager(2, BS)
    a, b = make_seq(range(BS)), make_seq(range(100, 100 + BS))
    for seq in (a, b):
        assert bm.allocate(seq)
        compute_all(bm, seq)
    a_block, b_block = a.block_table[0], b.block_table[0]
    bm.deallocate(a)
    bm.deallocate(b)
    assert len(bm.hash_to_block_id) == 2
    fresh = make_seq([7] * 5)
    assert bm.allocate(fresh)
    # The block that had a's prefix was freed first and is now overwritten: its hash must go.
    assert fresh.block_table == [a_block]
    assert bm.blocks[a_block].hash == -1
    assert list(bm.hash_to_block_id.values()) == [b_block]
    a_again, b_again = make_seq([*range(BS), 1]), make_seq([*range(100, 100 + BS), 1])
    assert not bm.allocate(a_again)  # needs 2 blocks, 1 free
    assert a_again.block_table == []
    bm.deallocate(fresh)
    assert bm.allocate(b_again)
    assert b_again.num_cached_tokens == BS and b_again.block_table[0] == b_block
    bm.deallocate(b_again)
    assert bm.allocate(a_again)
    assert a_again.num_cached_tokens == 0
    check_consistent(bm, [a_again])


def test_never_hands_out_a_referenced_block():
    bm = BlockManager(8, BS)
    prefix = list(range(3 * BS))
    live = []
    for i in range(4):
        seq = make_seq(prefix + [i] * (i + 1))
        assert bm.allocate(seq)
        compute_all(bm, seq)
        live.append(seq)
        check_consistent(bm, live)
    # 3 shared + 4 own blocks: one left. Take it through decode growth, then nothing is free.
    assert bm.num_free_blocks == 1
    grower = live[0]
    while bm.num_blocks_for(grower.num_tokens + 1) == len(grower.block_table):
        grower.append_token(1)
    grower.append_token(1)
    assert bm.can_append(grower)
    bm.may_append(grower)
    assert bm.num_free_blocks == 0
    check_consistent(bm, live)
    while bm.num_blocks_for(grower.num_tokens + 1) == len(grower.block_table):
        grower.append_token(1)
    grower.append_token(1)
    assert not bm.can_append(grower)


def test_may_append_only_at_block_boundary():
    bm = BlockManager(4, BS)
    seq = make_seq(range(BS - 1))
    assert bm.allocate(seq)
    seq.append_token(1)  # BS tokens: still one block
    assert bm.can_append(seq)
    bm.may_append(seq)
    assert len(seq.block_table) == 1
    seq.append_token(2)  # BS + 1 tokens: needs a second block
    bm.may_append(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    check_consistent(bm, [seq])


def test_hash_computed_blocks_registers_only_computed_full_blocks():
    bm = BlockManager(8, BS)
    seq = make_seq(range(3 * BS + 4))
    assert bm.allocate(seq)
    seq.num_computed_tokens = BS + 5  # a chunk that ends inside the second block
    bm.hash_computed_blocks(seq)
    assert [bm.blocks[b].hash != -1 for b in seq.block_table] == [True, False, False, False]
    seq.num_computed_tokens = 3 * BS + 4
    bm.hash_computed_blocks(seq)
    assert [bm.blocks[b].hash != -1 for b in seq.block_table] == [True, True, True, False]
    expected, h = [], -1
    for i in range(3):
        h = BlockManager.compute_hash(seq.token_ids[i * BS:(i + 1) * BS], h)
        expected.append(h)
    assert [bm.blocks[b].hash for b in seq.block_table[:3]] == expected
    check_consistent(bm, [seq])
