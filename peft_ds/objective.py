"""The training loop's step interface: how one optimizer step turns micro-batches into updates.

`Feed` hands out a rank's micro-batches of a global batch (drawn from the seed and the step, so every
world size sees the same records) with their dropout seeds. `Objective` is what a method may change:
per-step set-up, the micro-batch loss, the schedule of one global step (`train_step`), extra metrics,
and state that checkpoints carry. The plain methods use it as it is; AdaMix changes the loss and
BiLoRA the schedule (`peft_ds/bilevel.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import data


def micro_seed(seed: int, step: int, micro_index: int) -> int:
    """Dropout seed of one micro-batch: a function of its place in the global batch, not of the rank,
    so any world size (and a resumed run) draws the same masks."""
    return (seed * 1_000_003 + step * 4099 + micro_index) % (2**63)


@dataclass
class MicroBatches:
    batches: list  # collated micro-batches of this rank, on the engine's device
    seeds: list  # the dropout seed of each
    records: list  # the dataset indices of the whole global batch (every rank's share)


@dataclass
class Feed:
    rank: int
    world: int
    accumulation: int  # micro-batches per rank per optimizer step
    micro: int
    global_batch: int
    pad_id: int
    seed: int
    device: torch.device

    def micro_batches(self, dataset, index: int, stream: int = 0) -> MicroBatches:
        """Global batch number `index` of `dataset` (epochs of seeded permutations), this rank's share.
        `stream` keeps dropout seeds of different data streams (BiLoRA's D1 and D2) apart."""
        records = data.global_batch_indices(len(dataset), self.global_batch, self.seed + stream, index)
        share = self.accumulation * self.micro
        mine = records[self.rank * share:(self.rank + 1) * share]
        batches = [data.collate([dataset[i] for i in mine[k:k + self.micro]], self.pad_id)
                   for k in range(0, len(mine), self.micro)]
        seeds = [micro_seed(self.seed + stream, index, self.rank * self.accumulation + k) for k in range(len(batches))]
        return MicroBatches([{k: v.to(self.device) for k, v in b.items()} for b in batches], seeds, records)


class Objective:
    """What a method adds to the loop; the plain methods need nothing beyond the model's loss."""

    def begin_step(self, step: int) -> None:
        pass

    def loss(self, model, batch):
        return model(**batch).loss

    def train_step(self, engine, feed: Feed, dataset, step: int, after_backward=None) -> dict:
        """One optimizer step over the global batch `step`: forward and backward of each micro-batch
        (DeepSpeed accumulates, and steps at the last). `after_backward(k)` runs after micro-batch k's
        backward. Returns this rank's summed losses and tokens."""
        feed_step = feed.micro_batches(dataset, step)
        loss_sum = tokens = 0.0
        for k, (batch, seed) in enumerate(zip(feed_step.batches, feed_step.seeds)):
            torch.manual_seed(seed)
            loss = self.loss(engine, batch)
            engine.backward(loss)
            if after_backward is not None:
                after_backward(k)
            engine.step()
            loss_sum += loss.item()
            tokens += float(batch["attention_mask"].sum())
        return {"loss_sum": loss_sum, "losses": len(feed_step.batches), "tokens": tokens}

    def metrics(self) -> dict:
        return {}

    def write_outputs(self, out_dir: str, is_main: bool) -> dict:
        """Files of the method's own written at the end of a run (every rank calls it); their paths."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
