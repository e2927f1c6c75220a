"""One rank of a streaming-reader scenario, launched by tests/test_data.py through torchrun.

Not a test itself. Phases (each rank writes ``<out>/rank<R>.json``):
  epoch      one evaluation pass (every sample) and one training epoch; records both
  interrupt  an uninterrupted run of ``--steps`` training batches, then a fresh loader that stops after
             ``--stop`` batches and saves the all-gathered state to ``<out>/state.json`` (rank 0)
  resume     loads ``--state`` and records ``--steps`` training batches
A record is a list of batches, each ``{"epoch": e, "idx": [global sample indices]}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch.distributed as dist

from spellm_ds.data.loader import LoaderConfig, ShardLoader, all_gather_state


def record(loader: ShardLoader, batches, steps: int | None) -> list[dict]:
    """Take `steps` batches (all when None) and return their epochs and sample indices."""
    out = []
    for batch in itertools.islice(batches, steps):
        out.append({"epoch": loader.epoch, "idx": batch["sample_index"].tolist()})
    return out


def main() -> None:
    """Run one phase on this rank."""
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["epoch", "interrupt", "resume"])
    p.add_argument("--location", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--stop", type=int, default=0)
    p.add_argument("--state", default=None)
    args = p.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")

    def make(partial: bool = False) -> ShardLoader:
        cfg = LoaderConfig(
            location=args.location,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            seed=args.seed,
            partial=partial,
        )
        return ShardLoader(cfg)

    result: dict = {}
    if args.phase == "epoch":
        evaluation = make(partial=True)
        result["partial"] = record(evaluation, evaluation.iter_epoch(), None)
        training = make()
        result["train"] = record(training, training.iter_epoch(), None)
    elif args.phase == "interrupt":
        full = make()
        result["uninterrupted"] = record(full, full.forever(), args.steps)
        part = make()
        result["before"] = record(part, part.forever(), args.stop)
        state = all_gather_state(part)
        if dist.is_initialized() and dist.get_rank() != 0:
            pass
        else:
            Path(args.out, "state.json").write_text(json.dumps(state))
    else:
        loader = make()
        loader.load_state_dict(json.loads(Path(args.state).read_text()))
        result["after"] = record(loader, loader.forever(), args.steps)
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
