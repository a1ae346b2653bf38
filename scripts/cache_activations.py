"""Write LM activations once as memory-mapped shards (read back with data.source=cache).

    python scripts/cache_activations.py data.cache_dir=/scratch/acts data.lm=gpt2 \
        data.text=../shared/data/text/tinyshakespeare.txt data.hookpoints='[layers.6.residual]'
    python scripts/cache_activations.py data.cache_dir=/scratch/acts shard_sequences=512 dtype=float16

Takes the same `data.*` overrides as train.py (config group `data`, default `activations`), plus
`shard_sequences=` (sequences per shard, default 256), `dtype=` (float32 | float16 | bfloat16 is not a
numpy type: use float16 for half) and `max_shards=` (stop early). Rerunning the same command after an
interruption continues at the first missing shard; a cache of other settings in the same folder is refused.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> None:
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    import aeforge.cli  # noqa: F401 (registers the resolvers)
    from aeforge.data.activation_cache import write_cache

    extra = {"shard_sequences": 256, "dtype": "float32", "max_shards": None}
    overrides = []
    for a in argv:
        key = a.split("=", 1)[0]
        if key in extra:
            extra[key] = a.split("=", 1)[1]
        else:
            overrides.append(a)
    if not any(o.startswith("data=") for o in overrides):
        overrides.insert(0, "data=activations")
    with initialize_config_module("aeforge.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    cache_dir = cfg.data.cache_dir
    if not cache_dir:
        raise SystemExit("set data.cache_dir=<folder>")
    cfg.data.source = "lm"
    t0 = time.time()
    dm = instantiate(cfg.data, seed=cfg.seed)
    manifest = write_cache(
        dm,
        cache_dir,
        int(extra["shard_sequences"]),
        str(extra["dtype"]),
        None if extra["max_shards"] in (None, "null") else int(extra["max_shards"]),
    )
    tokens = sum(s["tokens"] for s in manifest["shards"])
    print(
        f"{cache_dir}: {len(manifest['shards'])} shards, {tokens} tokens x {manifest['hookpoints']} "
        f"(d={manifest['d']}), complete={manifest['complete']}, {time.time() - t0:.1f}s"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
