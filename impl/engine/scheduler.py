"""The scheduler (topics 2.6 and 2.7): which sequences run in the next step, and how many of
their tokens.

Each step has a token budget (`max_num_batched_tokens`) and a cap on running sequences
(`max_num_seqs`). Running sequences come first, their decode tokens before any prefill chunk,
so a long prompt never stalls the decodes (chunked prefill: a prompt longer than what is left
of the budget is computed over several steps). Waiting requests are admitted in arrival order,
none overtaking another. When the KV cache cannot hold a running sequence's next tokens, the
newest running sequence is preempted: its cache is freed and it goes back to the front of the
waiting queue, to be recomputed when readmitted (vLLM's preemption by recompute).

The KV cache's bookkeeping is `kv` (verbs: get_computed_blocks, can_allocate, allocate,
deallocate): the contiguous per-sequence cache (2.6) or the paged BlockManager (3.1).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from impl.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: (sequence, number of its tokens to compute), in the order the runner
    packs them, and the sequences preempted to make room."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    """Waiting and running queues under a token budget and a sequence cap."""

    def __init__(self, kv, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 enable_chunked_prefill: bool = True):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs and max_num_batched_tokens must be >= 1,"
                             f" got {max_num_seqs} and {max_num_batched_tokens}")
        if max_num_batched_tokens < max_num_seqs:  # else the running decodes alone could starve the oldest prefill
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least max_num_seqs"
                             f" ({max_num_seqs})")
        self.kv = kv
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Decode tokens first, then running prefills' chunks, then new admissions, within budget."""
        batch = ScheduledBatch()
        decodes = [s for s in self.running if not s.is_prefill]
        prefills = [s for s in self.running if s.is_prefill]
        order = decodes + prefills
        for i, seq in enumerate(order):
            budget = self.max_num_batched_tokens - batch.num_batched_tokens
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted by an earlier one this step
                continue
            n = self.num_new_tokens(seq, seq.num_computed_tokens, budget)
            if n == 0:
                continue
            if seq.spec_token_ids:  # a decode with drafts (topic 3.4): a chunk of 1 + k
                n = self.fit_drafts(seq, budget - (len(order) - i - 1))
            if not self._make_room(seq, n, batch):
                continue  # seq itself was preempted
            self.kv.allocate(seq, n)
            batch.scheduled.append((seq, n))
        if not batch.preempted:  # memory is short this step: admit no one
            self._admit(batch)
        return batch

    def num_new_tokens(self, seq: Sequence, num_computed: int, budget: int) -> int:
        """How many of seq's tokens after the first num_computed to compute this step, within
        budget: all or none without chunked prefill; with it, `chunk` decides. A preempted
        sequence's recompute is chunked either way: its prompt and output may have outgrown the
        budget, and all-or-none would never run it again."""
        todo = seq.num_tokens - num_computed
        if self.enable_chunked_prefill:
            return self.chunk(todo, budget)
        if seq.num_preemptions:  # a recompute: in budget-sized pieces, with or without topic 2.7
            return min(todo, budget)
        return todo if todo <= budget else 0

    @staticmethod
    def chunk(todo: int, budget: int) -> int:
        """Chunked prefill (topic 2.7): a prompt longer than what is left of the step's token
        budget is computed over several steps, one budget-sized chunk at a time."""
        return min(todo, budget)

    def fit_drafts(self, seq: Sequence, budget: int) -> int:
        """Speculative decoding (topic 3.4): seq's drafts clipped to what the budget (less a token for
        each running sequence after it) and the free KV blocks hold; drafts never preempt anyone.
        Returns the tokens to compute: the last token and the drafts kept."""
        k = min(len(seq.spec_token_ids), max(budget - 1, 0))
        while k and not self.kv.can_allocate(seq, 1 + k):
            k -= 1
        seq.spec_token_ids = seq.spec_token_ids[:k]
        return 1 + k

    def _make_room(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Preempt the newest running sequences until seq's next n tokens fit; False if seq
        itself had to go. A victim already scheduled this step leaves the batch."""
        while not self.kv.can_allocate(seq, n):
            victim = self.running[-1]
            self.preempt(victim)
            batch.preempted.append(victim)
            batch.scheduled = [(s, k) for s, k in batch.scheduled if s is not victim]
            if victim is seq:
                return False
        return True

    def _admit(self, batch: ScheduledBatch) -> None:
        """Admit waiting sequences in arrival order while the budget, the cap and the KV cache allow."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            budget = self.max_num_batched_tokens - batch.num_batched_tokens
            seq = self.waiting[0]
            hits = self.kv.get_computed_blocks(seq) if self.kv.enable_prefix_caching else []
            num_cached = len(hits) * self.kv.block_size
            n = self.num_new_tokens(seq, num_cached, budget)
            if n == 0 or not self.kv.can_allocate(seq, n, hits):
                break  # in order: no later request overtakes this one
            self.waiting.popleft()
            self.kv.record_lookup(seq.num_tokens, num_cached)
            self.kv.allocate(seq, n, hits)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.scheduled.append((seq, n))

    def preempt(self, seq: Sequence) -> None:
        """Free seq's cache and put it back at the front of the waiting queue (recomputed later)."""
        self.running.remove(seq)
        self.kv.deallocate(seq)
        seq.spec_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq (stop, length, abort): its cache is freed at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.deallocate(seq)
        seq.spec_token_ids = []
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
