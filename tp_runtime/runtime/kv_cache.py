"""The paged KV cache: a pool of fixed-size blocks per rank, and rank 0's manager of who holds which block.

Every rank holds, per layer, a pool of blocks with its KV heads' share of every block:

    k[layer], v[layer]: (num_blocks, kv_heads_per_rank, block_size, head_size)

A sequence's keys and values live in the blocks of its block table: position p is row p % block_size of
block table[p // block_size]. Block 0 never belongs to a sequence: writes that have nowhere to go (the right
padding of a prefill, a table's unused tail, the compile's dummy steps) land there, and no visible
position is ever read from it.

Rank 0's `BlockManager` owns the bookkeeping (the other ranks only see the tables it broadcasts with each
step): blocks are handed out as tokens arrive and given back when a sequence ends. A block whose positions
are all written is keyed by the hash of every token up to its end (a chain: the previous block's key and
this block's tokens), so a later sequence with the same prefix takes those blocks instead of prefilling them
again (prefix caching). A block nobody holds keeps its key and its contents until the pool runs short; then
the least recently released one is taken back (LRU).

StreamingLLM (`Streaming`): a sequence keeps its first sink blocks and a window of the latest blocks; when it
needs a position past them, its oldest window block goes back to the pool and the window's keys move one
block toward the sinks. Keys are cached after RoPE, so the moved keys are rotated back by block_size
positions (RoPE's rotations compose: R(p - d) = R(-d) R(p)), on every rank (model.rerotate), rather than
caching keys before RoPE and rotating the whole window at every step: a move costs one pass over the window
every block_size tokens, and positions stay within sinks + window, inside the RoPE tables and max_seq_len.

Sizing (`blocks_for`): without a memory budget the pool gives every one of max_batch_size sequences its
max_seq_len positions, as a slot-per-sequence cache would; with one (--kv_cache_memory), the pool is what
the budget holds and the scheduler admits sequences while blocks last.
"""

import math
from collections import OrderedDict

import torch

from tp_runtime.engine.format import EngineConfig
from tp_runtime.errors import UserError

DEFAULT_BLOCK_SIZE = 32
TRASH = 0  # the block that takes the writes with nowhere to go


def block_bytes(cfg: EngineConfig, rank: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block on `rank`: keys and values of every layer."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.kv_heads_per_rank[rank] * block_size * cfg.head_size * elem


def blocks_for(cfg: EngineConfig, rank: int, block_size: int, dtype: torch.dtype, max_batch_size: int,
               max_seq_len: int, memory: int | None = None) -> int:
    """The pool's block count (block 0 included): what `memory` bytes hold, or, without a budget, enough for
    max_batch_size sequences of max_seq_len. A budget too small for one max_seq_len sequence is an error."""
    per_sequence = math.ceil(max_seq_len / block_size)
    if memory is None:
        return max_batch_size * per_sequence + 1
    blocks = memory // block_bytes(cfg, rank, block_size, dtype)
    if blocks < per_sequence + 1:
        need = (per_sequence + 1) * block_bytes(cfg, rank, block_size, dtype)
        raise UserError(f"--kv_cache_memory {memory / 2**20:.0f} MiB holds {blocks} blocks of {block_size} tokens on "
                        f"rank {rank}; one --max_seq_len {max_seq_len} sequence needs {need / 2**20:.0f} MiB")
    return int(blocks)


class KVCache:
    """This rank's pools (see the module docstring). max_batch_size: the rows a step may hold."""

    def __init__(self, cfg: EngineConfig, rank: int, num_blocks: int, block_size: int, max_batch_size: int,
                 max_seq_len: int, dtype: torch.dtype, device: torch.device):
        if block_size < 1 or num_blocks < 2:
            raise UserError(f"the KV cache needs --block_size >= 1 and at least 2 blocks, got {block_size} and "
                            f"{num_blocks}")
        shape = (num_blocks, cfg.kv_heads_per_rank[rank], block_size, cfg.head_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    @property
    def tokens(self) -> int:
        """Positions the pool holds, block 0 left out."""
        return (self.num_blocks - 1) * self.block_size

    def rows_that_fit(self, length: int) -> int:
        """How many sequences of `length` positions the pool holds at once with blocks of their own."""
        return (self.num_blocks - 1) // max(1, math.ceil(length / self.block_size))

    def dense_tables(self, B: int, S: int, device=None) -> torch.Tensor:
        """Block tables giving rows 0..B-1 blocks of their own for positions 0..S-1, for a caller that owns the
        whole cache for one call (scoring, tp-verify)."""
        nb = math.ceil(S / self.block_size)
        if B * nb + 1 > self.num_blocks:
            raise ValueError(f"{B} rows of {S} positions need {B * nb + 1} blocks; the cache has {self.num_blocks}")
        return (1 + torch.arange(B * nb, device=device)).view(B, nb)  # (B, blocks per row)

    def trash_tables(self, B: int, nb: int, device=None) -> torch.Tensor:
        """Tables that send every position to block 0 (the compile's dummy steps)."""
        return torch.full((B, nb), TRASH, dtype=torch.long, device=device)


class Streaming:
    """The StreamingLLM policy: sink_tokens (rounded up to whole blocks) stay, then a window of at least `window`
    positions (whole blocks) of the latest tokens."""

    def __init__(self, sink_tokens: int, window: int, block_size: int, max_seq_len: int):
        if sink_tokens < 0 or window < 1:
            raise UserError(f"--sink_tokens must be >= 0 and --streaming_window >= 1, got {sink_tokens} and {window}")
        self.block_size = block_size
        self.sink_blocks = math.ceil(sink_tokens / block_size)
        self.window_blocks = math.ceil(window / block_size)
        self.capacity = (self.sink_blocks + self.window_blocks) * block_size  # positions a sequence holds
        if self.capacity > max_seq_len:
            raise UserError(f"--sink_tokens {sink_tokens} + --streaming_window {window} take {self.capacity} positions "
                            f"in blocks of {block_size}; raise --max_seq_len to at least that")

    @property
    def sink_positions(self) -> int:
        return self.sink_blocks * self.block_size

    def make_room(self, seq: "SequenceBlocks", positions: int, manager: "BlockManager") -> list[int]:
        """Before a sequence needs `positions` positions: if that is past the capacity, give its oldest window
        block back and return the window blocks whose keys must move one block toward the sinks (else [])."""
        if positions <= self.capacity or len(seq.table) <= self.sink_blocks + 1:
            return []
        manager.drop(seq, self.sink_blocks)
        return seq.table[self.sink_blocks :]


class SequenceBlocks:
    """One sequence's blocks as the manager sees them: the table, and the keys of its leading full blocks."""

    def __init__(self):
        self.table: list[int] = []
        self.keys: list[int] = []  # chain keys of table[:len(keys)], all full and registered
        self.cached_tokens = 0  # positions taken from the prefix cache at admission


class BlockManager:
    """Rank 0's bookkeeping of the pool's blocks 1..num_blocks-1 (see the module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True):
        self.block_size, self.prefix_cache = block_size, prefix_cache
        self.usable = num_blocks - 1
        self.free = list(range(num_blocks - 1, 0, -1))  # held by nobody, keyed by nothing; the last freed first
        self.refs = [0] * num_blocks
        self.key_of: dict[int, int] = {}  # block -> chain key
        self.block_of: dict[int, int] = {}  # chain key -> block
        self.idle: OrderedDict[int, None] = OrderedDict()  # keyed blocks held by nobody, least recent first
        self.queried_tokens = self.hit_tokens = 0
        self.preemptions = 0  # counted by the scheduler: sequences that gave their blocks back to others

    # --- what a scheduler asks ---

    @property
    def available(self) -> int:
        """Blocks a sequence can get now (free ones and cached ones nobody holds)."""
        return len(self.free) + len(self.idle)

    @property
    def in_use(self) -> int:
        return self.usable - self.available

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def blocks_needed(self, positions: int) -> int:
        return math.ceil(positions / self.block_size)

    def admit(self, tokens: list[int], reserve: int = 0) -> SequenceBlocks | None:
        """Blocks for a sequence whose first len(tokens) positions are to be filled: the longest cached prefix of
        full blocks (at most len - 1 positions, so at least one token is computed for its logits), fresh blocks
        for the rest. None, taking nothing, when fewer than `reserve` blocks would remain after it."""
        seq = SequenceBlocks()
        hits = self._match(tokens) if self.prefix_cache else []
        fresh = self.blocks_needed(len(tokens)) - len(hits)
        reusable_idle = sum(1 for b, _ in hits if self.refs[b] == 0)
        if fresh + reserve > self.available - reusable_idle:
            return None
        for block, key in hits:
            self._hold(block)
            seq.table.append(block)
            seq.keys.append(key)
        seq.table += [self._take() for _ in range(fresh)]
        seq.cached_tokens = len(hits) * self.block_size
        self.queried_tokens += len(tokens)
        self.hit_tokens += seq.cached_tokens
        return seq

    def grow(self, seq: SequenceBlocks, positions: int) -> bool:
        """Make seq's table cover `positions` positions; False (taking nothing) when the pool cannot."""
        more = self.blocks_needed(positions) - len(seq.table)
        if more > self.available:
            return False
        seq.table += [self._take() for _ in range(max(0, more))]
        return True

    def register(self, seq: SequenceBlocks, tokens: list[int]) -> None:
        """The keys and values of positions 0..len(tokens)-1 are written: key every full block not keyed yet, so
        later sequences can take it. A block whose key is held by another block already stays unkeyed."""
        if not self.prefix_cache:
            return
        bs = self.block_size
        while len(seq.keys) < min(len(tokens) // bs, len(seq.table)):
            i = len(seq.keys)
            key = self._key(seq.keys[-1] if seq.keys else None, tokens[i * bs : (i + 1) * bs])
            block = seq.table[i]
            if key not in self.block_of and block not in self.key_of:
                self.block_of[key], self.key_of[block] = block, key
            seq.keys.append(key)

    def drop(self, seq: SequenceBlocks, index: int) -> None:
        """Take block `index` out of seq's table and give it back (StreamingLLM, where the prefix cache is off:
        the blocks that stay are rewritten)."""
        block = seq.table.pop(index)
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free.append(block)

    def release(self, seq: SequenceBlocks) -> None:
        """The sequence ended (or was preempted): its blocks go back; keyed ones stay cached until needed."""
        for block in seq.table:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)
        seq.table, seq.keys = [], []

    # --- inside ---

    @staticmethod
    def _key(previous: int | None, tokens: list[int]) -> int:
        return hash((previous, tuple(tokens)))

    def _match(self, tokens: list[int]) -> list[tuple[int, int]]:
        out, key = [], None
        for i in range((len(tokens) - 1) // self.block_size):
            key = self._key(key, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.block_of.get(key)
            if block is None:
                break
            out.append((block, key))
        return out

    def _hold(self, block: int) -> None:
        if self.refs[block] == 0:
            self.idle.pop(block, None)
        self.refs[block] += 1

    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        else:  # evict the least recently released cached block
            block, _ = self.idle.popitem(last=False)
            del self.block_of[self.key_of.pop(block)]
        self.refs[block] = 1
        return block
