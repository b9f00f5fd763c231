"""Which training pairs each step draws: a fresh permutation per epoch, dealt out in micro-batches by a DataLoader
(accelerate shards it over processes), and, from the same permutation, the pairs a run of trainer.max_steps
draws at all (the reference pass scores only those: recipe.py).
"""
from __future__ import annotations

from functools import partial

import torch

from midpo_cli.data.tokenize import collate


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n training pairs in `epoch` (from seed + epoch): what EpochShuffle yields."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


class EpochShuffle(torch.utils.data.Sampler):
    """A fresh permutation per epoch from seed + epoch: the same order for any number of processes."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(permutation(self.n, self.seed, self.epoch))

    def __len__(self) -> int:
        return self.n


def pairs_drawn(n: int, seed: int, batch_size: int, grad_accum: int, processes: int,
                max_steps: int) -> list[int] | None:
    """Indices (ascending) of the training pairs that steps 1..max_steps draw, or None when the run needs a full
    epoch or more (then every pair). The loader deals each epoch's permutation out in batches of batch_size,
    process p taking batches p, p + processes, ... (accelerate's shards; an incomplete last round is dropped).
    Each step takes grad_accum of them per process, and accelerate's loader collates one batch ahead of the one
    it hands out; so steps 1..S read the permutation's first (S x grad_accum + 1) x processes x batch_size pairs."""
    per_epoch = n // batch_size // processes                               # micro-batches per process and epoch
    rounds = max_steps * grad_accum
    if rounds >= per_epoch:
        return None
    return sorted(permutation(n, seed, 0)[:(rounds + 1) * processes * batch_size])


def checked_collate(pairs: list, pad_id: int, required: tuple[str, ...] = (), pack: str | None = None) -> dict:
    """collate, after checking that every pair carries the per-token columns the run relies on (the cached
    reference log-probs): without them a batch would fall back to the live reference, or fail with a KeyError."""
    for name in required:
        if any(name not in p.values for p in pairs):
            raise ValueError(f"a pair drawn for training or evaluation has no '{name}' column (cached reference "
                             "log-probs): the reference pass did not score it. This is a bug in midpo, please report "
                             "it; trainer.ref_cache=false runs without the cache meanwhile")
    return collate(pairs, pad_id, pack)


def data_loader(pairs: list, batch_size: int, seed: int, pad_id: int, required: tuple[str, ...] = (),
                pack: str | None = None):
    """Shuffled micro-batches of `batch_size` pairs (incomplete last batch dropped), collated on the fly (with the
    packed layout `pack`: engine/pack.py); each pair must carry the per-token columns `required`. The loader has a
    generator of its own: each new iterator (every epoch, and the first one after a resume) draws its base seed from
    it, never from the global torch RNG, so random draws during training (e.g. dropout in a prior) continue after a
    resume exactly as in the uninterrupted run."""
    return torch.utils.data.DataLoader(pairs, batch_size=batch_size, sampler=EpochShuffle(len(pairs), seed),
                                       drop_last=True, generator=torch.Generator().manual_seed(seed),
                                       collate_fn=partial(checked_collate, pad_id=pad_id, required=required, pack=pack))


def endless(acc, loader, position: int):
    """Micro-batches forever, starting `position` micro-batches in (epoch e uses permutation seed + e).
    The epoch is set on the prepared loader (accelerate re-sets its sampler's epoch from it at every pass)."""
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError("fewer training pairs than one global batch (trainer.batch_size x processes); "
                         "lower trainer.batch_size or add data")
    epoch, skip = divmod(position, per_epoch)
    while True:
        part = acc.skip_first_batches(loader, skip) if skip else loader
        part.set_epoch(epoch)
        yield from part
        epoch, skip = epoch + 1, 0
