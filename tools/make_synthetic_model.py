#!/usr/bin/env python3
"""A stand-in model directory of a given size, for measuring how models travel: random bytes
in safetensors-named shards (incompressible, as weights are) beside the small json files a
model has. Nothing loads it: it only has a model's shape on disk.

    python tools/make_synthetic_model.py DIR --gib 4 [--shard-gib 1]

The same DIR and sizes are left as they are on a second call (a benchmark re-run reuses them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

CHUNK = 1 << 24


def make(model: Path, total: int, shard: int) -> list[Path]:
    """Write the model's files into ``model``; the files, largest first."""
    model.mkdir(parents=True, exist_ok=True)
    count = max(1, -(-total // shard))
    sizes = [shard] * (count - 1) + [total - shard * (count - 1)]
    shards = []
    for n, size in enumerate(sizes, 1):
        path = model / f"model-{n:05d}-of-{count:05d}.safetensors"
        if not (path.exists() and path.stat().st_size == size):
            with open(path, "wb") as f:
                left = size
                while left:
                    step = min(CHUNK, left)
                    f.write(os.urandom(step))
                    left -= step
        shards.append(path)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {f"layer.{n}.weight": p.name for n, p in enumerate(shards)},
    }
    small = {
        "config.json": {"architectures": ["SyntheticForCausalLM"], "model_type": "synthetic"},
        "generation_config.json": {"max_new_tokens": 16},
        "tokenizer_config.json": {"model_max_length": 1024},
        "model.safetensors.index.json": index,
    }
    for name, content in small.items():
        (model / name).write_text(json.dumps(content, indent=2) + "\n")
    return shards + [model / name for name in small]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--gib", type=float, required=True, help="size of the shards together")
    parser.add_argument("--shard-gib", type=float, default=1.0, help="size of one shard")
    args = parser.parse_args(argv)
    total, shard = int(args.gib * (1 << 30)), int(args.shard_gib * (1 << 30))
    if total <= 0 or shard <= 0:
        parser.error("--gib and --shard-gib must be positive")
    files = make(args.dir, total, shard)
    print(f"{args.dir}: {len(files)} files, {sum(f.stat().st_size for f in files)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
