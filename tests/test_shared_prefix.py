"""Shared-prefix (cascade) decode on the CPU: decode_attention with a SharedPrefix equals it without one, the
host's grouping of a decode batch (step_packing.shared_prefix_groups) and its packing, and n samples and shared
system prompts through the engine with grouping on and off."""
from __future__ import annotations

import random
from array import array

import pytest
import torch

from checkpoints import make_checkpoint
from flashgen import LLM, SamplingParams
from flashgen.engine import step_packing
from flashgen.engine.sequence import Sequence
from flashgen.engine.step_packing import (
    SHARED_GROUP,
    SHARED_GROUP_WIDE,
    STEP_DTYPE,
    pack_step,
    shared_prefix_groups,
    unpack_step,
)
from flashgen.ops import torch_ops
from flashgen.ops.backend import SharedPrefix


def shared_batch(groups: list[tuple[int, list[int]]], singles: list[int], bs: int, hkv: int, d: int,
                 dtype: torch.dtype, gen: torch.Generator, device: str = "cpu", pad_groups: int = 1,
                 group: int = SHARED_GROUP):
    """A random paged cache and a decode batch in which each group (shared blocks, [tokens past them per member])
    shares its leading blocks, plus sequences in no group; groups of more than `group` members are cut in chunks
    as the engine cuts them, and `pad_groups` unused groups follow (as in a captured graph). Returns
    (k_cache, v_cache, context_lens, block_tables, SharedPrefix), block ids shuffled over the cache."""
    lens, tables = [], []
    q_rows, glens, gtables, skip = [], [], [], []
    nblocks = sum(p + sum(-(-o // bs) for o in own) for p, own in groups) + sum(-(-n // bs) for n in singles)
    ids = torch.randperm(nblocks + 3, generator=gen).tolist()
    take = iter(ids).__next__
    for p, own in groups:
        prefix = [take() for _ in range(p)]
        rows = []
        for o in own:
            rows.append(len(lens))
            lens.append(p * bs + o)
            tables.append(prefix + [take() for _ in range(-(-o // bs))])
            skip.append(p)
        n = -(-len(rows) // group)
        for j in range(n):
            chunk = rows[j * len(rows) // n:(j + 1) * len(rows) // n]
            q_rows.append(chunk + [-1] * (group - len(chunk)))
            glens.append(p * bs)
            gtables.append(prefix)
    for n in singles:
        lens.append(n)
        tables.append([take() for _ in range(-(-n // bs))])
        skip.append(0)
    for _ in range(pad_groups):
        q_rows.append([-1] * group)
        glens.append(0)
        gtables.append([])
    width = max(len(t) for t in tables + gtables)
    pad = [t + [0] * (width - len(t)) for t in tables]
    gpad = [t + [0] * (width - len(t)) for t in gtables]
    i32 = dict(dtype=torch.int32, device=device)
    shape = (nblocks + 3, bs, hkv, d)
    kc = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    vc = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    ctx = torch.tensor(lens, **i32)
    sp = SharedPrefix(torch.tensor(q_rows, **i32), torch.tensor(glens, **i32), torch.tensor(gpad, **i32),
                      torch.tensor(skip, **i32), ctx - torch.tensor(skip, **i32) * bs)
    return kc, vc, ctx, torch.tensor(pad, **i32), sp


CASES = [  # (groups, singles, block_size)
    ([(2, [1, 5, 17, 16])], [40], 16),
    ([(1, [1, 1]), (4, [30] * (SHARED_GROUP + 3))], [], 16),  # two chunks
    ([(3, [64, 1, 65])], [1, 200, 7], 64),
    ([(9, [3] * 8), (1, [100, 2])], [1025], 16),
]


@pytest.mark.parametrize("groups,singles,bs", CASES)
@pytest.mark.parametrize("hkv,group", [(2, 1), (1, 3), (2, 4), (1, 8)])
def test_shared_prefix_decode_equals_plain_decode(groups, singles, bs, hkv, group):
    gen = torch.Generator().manual_seed(hash((str(groups), hkv, group)) % 2**31)
    d = 64
    kc, vc, ctx, bt, sp = shared_batch(groups, singles, bs, hkv, d, torch.float32, gen)
    q = torch.randn((ctx.shape[0], hkv * group, d), generator=gen)
    plain = torch_ops.decode_attention(q, kc, vc, ctx, bt, d**-0.5)
    split = torch_ops.decode_attention(q, kc, vc, ctx, bt, d**-0.5, shared=sp)
    torch.testing.assert_close(split, plain, rtol=1e-5, atol=1e-6)
    # bf16: one rounding, as without groups (the shared part stays float32 until the merge)
    qb, kb, vb = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    ref = torch_ops.decode_attention(qb.float(), kb.float(), vb.float(), ctx, bt, d**-0.5)
    err_plain = (torch_ops.decode_attention(qb, kb, vb, ctx, bt, d**-0.5).float() - ref).abs().max()
    err_split = (torch_ops.decode_attention(qb, kb, vb, ctx, bt, d**-0.5, shared=sp).float() - ref).abs().max()
    assert err_split <= 2 * err_plain + 1e-6, (err_split, err_plain)


def test_shared_prefix_with_a_window_is_refused():
    gen = torch.Generator().manual_seed(0)
    kc, vc, ctx, bt, sp = shared_batch([(2, [3, 4])], [], 16, 1, 64, torch.float32, gen)
    with pytest.raises(ValueError, match="sliding window"):
        torch_ops.decode_attention(torch.randn(2, 1, 64), kc, vc, ctx, bt, 0.1, window=8, shared=sp)


def seq(table: list[int], length: int, bs: int = 16) -> Sequence:
    s = Sequence("r", None, [1] * length, None, bs, 0)  # type: ignore[arg-type]
    s.block_table = array("i", table)
    return s


def test_groups_take_the_blocks_all_members_share():
    # a: 4 blocks, b shares its first 3, c its first 2 (a prefix-cache hit of another depth), d shares nothing
    seqs = [seq([10, 11, 12, 13, 14], 70), seq([10, 11, 12, 20], 60), seq([10, 11, 30, 31], 64),
            seq([40, 41], 30)]
    assert shared_prefix_groups(seqs, 16).as_list() == [([0, 1, 2], 2)]


def test_a_group_never_takes_the_block_a_member_writes():
    # b's new token (position 32) is in block 12, which it shares: never possible after copy-on-write, but the
    # group must still stop before the block holding any member's new token
    seqs = [seq([10, 11, 12, 13], 60), seq([10, 11, 12], 33)]
    assert shared_prefix_groups(seqs, 16).as_list() == [([0, 1], 2)]


@pytest.mark.parametrize("group", [SHARED_GROUP, SHARED_GROUP_WIDE])
def test_large_groups_are_cut_into_chunks_of_at_most_the_group_size(group):
    seqs = [seq([7, 8, 100 + i], 40) for i in range(2 * group + 1)]
    groups = shared_prefix_groups(seqs, 16, group=group).as_list()
    sizes = [len(rows) for rows, _ in groups]
    assert len(groups) == 3 and sum(sizes) == len(seqs) and max(sizes) <= group and min(sizes) >= 2
    assert sorted(r for rows, _ in groups for r in rows) == list(range(len(seqs)))
    assert all(p == 2 for _, p in groups)


def test_grouping_is_skipped_when_it_saves_little():
    # 1 shared block of 16 tokens out of 2 x 1000: not worth a second launch
    seqs = [seq([5] + list(range(100, 163)), 1000), seq([5] + list(range(200, 263)), 1000)]
    assert shared_prefix_groups(seqs, 16).as_list() == []


def plain_groups(seqs: list[Sequence], bs: int, group: int) -> list[tuple[list[int], int]]:
    """The grouping rule read plainly: rows with more than a block, by first block id; a set's shared run is the
    longest run of ids every member has in common with the first, at most its shortest member's blocks before
    the one holding its new token; sets cut into ceil(m / group) near-equal groups; none if it saves under
    SHARED_MIN_SAVING of the tokens read."""
    sets: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        if len(s.token_ids) > bs:
            sets.setdefault(s.block_table[0], []).append(i)
    out, saved = [], 0
    for rows in sets.values():
        if len(rows) < 2:
            continue
        p = min((len(seqs[i].token_ids) - 1) // bs for i in rows)
        for i in rows:
            k = 0
            while k < p and seqs[i].block_table[k] == seqs[rows[0]].block_table[k]:
                k += 1
            p = k
        n = -(-len(rows) // group)
        for j in range(n):
            chunk = rows[j * len(rows) // n:(j + 1) * len(rows) // n]
            out.append((chunk, p))
            saved += (len(chunk) - 1) * p * bs
    return out if saved >= step_packing.SHARED_MIN_SAVING * sum(len(s.token_ids) for s in seqs) else []


@pytest.mark.parametrize("group", [SHARED_GROUP, SHARED_GROUP_WIDE])
def test_grouping_and_its_packing_match_the_plain_rule_on_random_batches(group):
    """Random decode batches: prompts behind a few prefixes cached to different depths, forks of n samples,
    sequences of their own, lengths at and around block boundaries; the array grouping equals the plain reading
    of the rule, and the packed SharedPrefix fields say the same."""
    rng, bs, grouped = random.Random(group), 16, 0
    for trial in range(80):
        prefixes = [[1000 * (k + 1) + j for j in range(rng.randint(2, 16))] for k in range(rng.randint(1, 3))]
        seqs, nxt = [], 10**6
        for _ in range(rng.choice([2, 5, 40, 70])):
            prefix = rng.choice(prefixes)
            # past its prefix by a token, a block, a block and a token, 97 tokens..., or a length of its own
            length = len(prefix) * bs + rng.choice([1, bs, bs + 1, 97, rng.randint(1, 64)])
            length = length if rng.random() < 0.9 else rng.choice([1, bs, bs + 1, 2 * bs])
            nblk = -(-length // bs)
            # the whole prefix (a hit, or a fork's blocks), part of it (a hit cached to another depth) or none
            head = prefix[:len(prefix) if rng.random() < 0.97 else rng.randint(0, len(prefix))][:nblk]
            table = head + list(range(nxt, nxt + nblk - len(head)))
            nxt += nblk
            seqs.append(seq(table, length, bs))
        want = plain_groups(seqs, bs, group)
        grouped += bool(want)
        got = shared_prefix_groups(seqs, bs, group=group).as_list()
        assert sorted(got) == sorted(want), trial
        _, ctx, _ = unpack_step(pack_step(seqs, False, bs, list(range(len(seqs))), shared_prefix=group),
                                torch.device("cpu"))
        sp = ctx.shared
        if not want:
            assert sp is None
            continue
        assert sp is not None
        shared = list(zip(sp.q_rows.tolist(), sp.lens.tolist(), sp.tables.tolist(), strict=True))
        packed = sorted(([r for r in q if r >= 0], n // bs) for q, n, _ in shared)
        assert packed == sorted(want)
        skip = {r: p for rows, p in want for r in rows}
        assert sp.skip.tolist() == [skip.get(i, 0) for i in range(len(seqs))]
        assert sp.suffix_lens.tolist() == [len(s.token_ids) - bs * skip.get(i, 0) for i, s in enumerate(seqs)]
        for q, n, table in shared:
            lead = list(seqs[q[0]].block_table)
            assert table[:n // bs] == lead[:n // bs] and not any(table[n // bs:])
    assert grouped >= 30  # 30 or more of the 80 batches group (the others check that none is packed)


def test_a_prefill_step_packs_as_a_plain_reading_of_its_chunks():
    """Random prefill steps (chunks from position 0 or after a prefix-cache hit, chunks that end their prompt and
    chunks that do not, lengths 1, 97, at and around block boundaries): ids, positions, cache slots, context
    lengths, offsets and the wanted rows equal each chunk's plain reading."""
    rng, bs = random.Random(5), 16
    for _ in range(40):
        seqs, nxt = [], 0
        for _ in range(rng.choice([1, 3, 48])):
            length = rng.choice([1, 2, 15, 16, 17, 97, 1025, rng.randint(1, 300)])
            nblk = -(-length // bs)
            s = seq(list(range(nxt + nblk - 1, nxt - 1, -1)), length, bs)  # block ids out of order
            nxt += nblk
            s.token_ids = array("i", [rng.randrange(3, 500) for _ in range(length)])
            s.num_computed_tokens = rng.choice([0, 0, (length - 1) // bs * bs, rng.randrange(length)])
            s.num_scheduled_tokens = rng.choice([length - s.num_computed_tokens, rng.randint(1, length -
                                                                                            s.num_computed_tokens)])
            seqs.append(s)
        ids, ctx, rows = unpack_step(pack_step(seqs, True, bs), torch.device("cpu"))
        want_ids, want_pos, want_slots, want_cu, want_rows = [], [], [], [0], []
        for s in seqs:
            a, n = s.num_computed_tokens, s.num_scheduled_tokens
            want_ids += list(s.token_ids[a:a + n])
            want_pos += list(range(a, a + n))
            want_slots += [s.block_table[p // bs] * bs + p % bs for p in range(a, a + n)]
            want_cu.append(want_cu[-1] + n)
            if a + n == len(s.token_ids):
                want_rows.append(want_cu[-1] - 1)
        assert ids.tolist() == want_ids and ctx.positions.tolist() == want_pos
        assert ctx.slot_mapping.tolist() == want_slots and ctx.cu_seqlens_q.tolist() == want_cu
        assert ctx.context_lens.tolist() == [s.num_computed_tokens + s.num_scheduled_tokens for s in seqs]
        assert rows.tolist() == want_rows and ctx.max_seqlen_q == max(s.num_scheduled_tokens for s in seqs)


@pytest.mark.parametrize("group", [SHARED_GROUP, SHARED_GROUP_WIDE])
def test_pack_and_unpack_carry_the_groups(group):
    seqs = [seq([10, 11, 12, 13], 60), seq([10, 11, 20], 40), seq([30, 31], 20)]
    buf = pack_step(seqs, False, 16, [1, 2, 3], shared_prefix=group)
    _, ctx, _ = unpack_step(buf, torch.device("cpu"))
    sp = ctx.shared
    assert sp is not None
    assert sp.q_rows.tolist() == [[0, 1] + [-1] * (group - 2)]
    assert sp.lens.tolist() == [32] and sp.tables[0, :2].tolist() == [10, 11]
    assert sp.skip.tolist() == [2, 2, 0] and sp.suffix_lens.tolist() == [28, 8, 20]
    _, plain, _ = unpack_step(pack_step(seqs, False, 16, [1, 2, 3]), torch.device("cpu"))
    assert plain.shared is None and torch.equal(plain.block_tables, ctx.block_tables)
    # the decode plan's bound: the most tokens one sequence attends to past its group's shared blocks
    assert ctx.longest == 28 and plain.longest == 60
    for s in seqs:
        s.num_computed_tokens, s.num_scheduled_tokens = 0, len(s.token_ids)
    _, pre, _ = unpack_step(pack_step(seqs, True, 16), torch.device("cpu"))
    assert pre.is_prefill and pre.longest is None


@pytest.mark.parametrize("prefill", [True, False])
def test_a_packed_step_unpacks_into_views_of_its_one_int32_copy(prefill):
    """Every field the kernels read is int32 already: unpacking makes views of the step's one copy to the device,
    no conversion (here on the CPU, where that copy is the buffer itself)."""
    seqs = [seq([10, 11, 12, 13], 60), seq([10, 11, 20], 40), seq([30, 31], 20)]
    if prefill:
        for s in seqs:
            s.num_computed_tokens, s.num_scheduled_tokens = 0, len(s.token_ids)
    buf = pack_step(seqs, prefill, 16, None if prefill else [1, 2, 3], shared_prefix=0 if prefill else SHARED_GROUP)
    assert buf.dtype == STEP_DTYPE == torch.int32
    ids, ctx, rows = unpack_step(buf, torch.device("cpu"))
    fields = [ids, rows, ctx.positions, ctx.slot_mapping, ctx.context_lens, ctx.cu_seqlens_q, ctx.block_tables]
    if not prefill:
        assert ctx.shared is not None
        fields += [ctx.shared.q_rows, ctx.shared.lens, ctx.shared.tables, ctx.shared.skip, ctx.shared.suffix_lens]
    base = buf.untyped_storage().data_ptr()
    assert all(t.dtype == torch.int32 and t.untyped_storage().data_ptr() == base for t in fields)
    assert ctx.context_lens.tolist() == [60, 40, 20] and ctx.block_tables[0, :2].tolist() == [10, 11]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("shared"), "qwen3", hidden_size=64, num_heads=4,
                               num_kv_heads=2, head_dim=32, num_layers=2))


def test_engine_outputs_equal_with_grouping_on_and_off(model_dir, monkeypatch):
    """n samples and prompts behind one cached system prompt decode in groups; the tokens equal those of the
    same run with grouping off (float32)."""
    rng = random.Random(0)
    system = [rng.randrange(3, 500) for _ in range(50)]
    prompts = [system + [rng.randrange(3, 500) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    params = [SamplingParams(temperature=1.0, seed=i, n=1 + 3 * (i % 2), max_tokens=24, ignore_eos=True)
              for i in range(6)]
    grouped_steps = []
    real = step_packing.shared_prefix_groups

    def spy(*args):
        groups = real(*args)
        grouped_steps.append(len(groups))
        return groups

    monkeypatch.setattr(step_packing, "shared_prefix_groups", spy)
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FLASHGEN_SHARED_PREFIX", flag)
        llm = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16)
        outs[flag] = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
        if flag == "1":
            assert sum(g > 0 for g in grouped_steps) >= 20  # most decode steps ran grouped
    assert outs["1"] == outs["0"]


def test_grouped_graph_buckets_cover_every_group_count():
    """A decode batch of up to bs rows has at most bs // 2 groups; with fine buckets (the PF_SHARED kernel's wide
    groups) each count maps to the smallest group bucket that holds it, powers of two below the top one, so a step
    with few groups replays a graph with few; else every grouped step replays the top one."""
    from flashgen.engine.cuda_graphs import buckets, group_buckets

    assert group_buckets(1) == [1] and group_buckets(2) == [1] and group_buckets(8) == [1, 2, 4]
    assert group_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert group_buckets(48) == [1, 2, 4, 8, 16, 24]
    assert group_buckets(256, fine=False) == [128] and group_buckets(1, fine=False) == [1]  # the decode kernel's
    for bs in buckets(512):
        gb = group_buckets(bs)
        assert gb == sorted(set(gb)) and gb[-1] == max(1, bs // 2)
        for ng in range(1, bs // 2 + 1):
            b = next(x for x in gb if x >= ng)
            assert b < 2 * ng or b == gb[0], (bs, ng, b)


def test_shared_splits_follow_the_prefix_and_refuse_bad_overrides(monkeypatch):
    """The PF_SHARED kernel's key splits: one per SHARED_SPLIT_KEYS shared tokens, 1 to SHARED_MAX_SPLITS, one at
    head_dim 256; FLASHGEN_SHARED_SPLITS overrides within that range, and a bad value is refused at every
    head_dim."""
    from flashgen.ops.cuda_attention import SHARED_MAX_SPLITS, SHARED_SPLIT_KEYS, shared_splits

    monkeypatch.delenv("FLASHGEN_SHARED_SPLITS", raising=False)
    assert shared_splits(100, 128) == 1
    assert shared_splits(3 * SHARED_SPLIT_KEYS + 5, 128) == 3
    assert shared_splits(10**6, 64) == SHARED_MAX_SPLITS
    assert shared_splits(10**6, 256) == 1
    monkeypatch.setenv("FLASHGEN_SHARED_SPLITS", "5")
    assert shared_splits(100, 128) == 5 and shared_splits(100, 256) == 1
    for bad in ("0", str(SHARED_MAX_SPLITS + 1), "two", "-1", "2.5"):
        monkeypatch.setenv("FLASHGEN_SHARED_SPLITS", bad)
        for d in (128, 256):
            with pytest.raises(ValueError, match="FLASHGEN_SHARED_SPLITS must be a whole number in"):
                shared_splits(1000, d)
    monkeypatch.delenv("FLASHGEN_SHARED_SPLITS")
    monkeypatch.setenv("FLASHGEN_SHARED_SPLIT_KEYS", "128")  # the tokens per split: the grid follows them
    assert shared_splits(3 * 128 + 5, 128) == 3 and shared_splits(10**6, 64) == SHARED_MAX_SPLITS
    for bad in ("0", "100", "8256", "x", "-64"):
        monkeypatch.setenv("FLASHGEN_SHARED_SPLIT_KEYS", bad)
        for d in (128, 256):
            with pytest.raises(ValueError, match="FLASHGEN_SHARED_SPLIT_KEYS must be a multiple of 64 in"):
                shared_splits(1000, d)


def test_shared_overlap_follows_graph_capture_and_is_checked(monkeypatch):
    """FLASHGEN_SHARED_OVERLAP: auto (the default) runs a shared-prefix step's parts side by side inside a CUDA-graph
    capture only (an eager call here: one after the other), 1 always, 0 never; any other value is refused with the
    variable, the value and the choices."""
    from flashgen.ops import cuda_attention

    monkeypatch.delenv("FLASHGEN_SHARED_OVERLAP", raising=False)
    assert cuda_attention.shared_overlap() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert cuda_attention.shared_overlap() is True
    monkeypatch.setenv("FLASHGEN_SHARED_OVERLAP", "0")
    assert cuda_attention.shared_overlap() is False
    monkeypatch.setenv("FLASHGEN_SHARED_OVERLAP", "1")
    assert cuda_attention.shared_overlap() is True
    monkeypatch.setenv("FLASHGEN_SHARED_OVERLAP", "yes")
    with pytest.raises(ValueError, match=r"FLASHGEN_SHARED_OVERLAP must be one of auto, 0, 1, got 'yes'"):
        cuda_attention.shared_overlap()
