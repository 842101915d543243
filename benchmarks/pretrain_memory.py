"""Peak memory of `totobench pretrain` on token shards at 1x and 4x the corpus size (target: flat,
ratio <= 1.1).

Two shard folders are written with the shard writer of `totobench tokenize` (shards.py): N (then
4N) videos of 64 stored frames of random codes (64 tokens a frame, 256 codes, uint16), so the
tokens alone are 128 MiB at 1x and 512 MiB at 4x at the default N, with a random-init VQ-VAE as
their tokenizer. The tokens are synthetic: what is measured is pre-training's reading of shards,
which does not look at the code values. Each size then runs the same `totobench pretrain` (same
config, same steps) in a fresh subprocess, which reports its peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and the peak of its anonymous memory (RssAnon of
/proc/self/status, sampled every 20 ms). Were the tokens held in memory, the 4x run would need
384 MiB more than the 1x run (a ratio near 1.4 from ~920 MiB).

    nice -n 10 .venv/bin/python benchmarks/pretrain_memory.py [--videos 16384] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from extract_memory import _rss_anon_kib  # the same sampler as the extraction benchmark (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
FRAMES, TOKENS_PER_FRAME, CODES = 64, 64, 256
CONFIG = {
    "name": "memory-bench", "seed": 0, "threads": 1,
    "model": {"preset": "toto-tiny", "dim": 64, "n_layers": 2, "n_heads": 2, "mlp_hidden": 128,
              "codebook_size": CODES, "max_seq_len": 1024, "resolution": 64, "num_frames": 8, "frame_stride": 4},
    "data": {"heldout_fraction": 0.05},
    "train": {"batch_size": 4, "micro_batch_size": 4, "warmup_steps": 2, "checkpoint_every": 1000, "log_every": 5},
    "eval": {"heldout_sequences": 8, "batch_size": 4},
}


def write_shards(folder: Path, videos: int, seed: int) -> int:
    """`videos` sequences of random codes as token shards; returns the bytes of the tokens."""
    from totobench.pretrain.corpus import heldout_bucket
    from totobench.pretrain.shards import ShardWriter, token_dtype, write_index
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, "shard", token_dtype(CODES), 1 << 24, folder / "progress.json")
    rng = np.random.default_rng(seed)
    for v in range(videos):
        writer.append(rng.integers(0, CODES, FRAMES * TOKENS_PER_FRAME), "video", 0, heldout_bucket(f"v{v}.mp4"))
        if v % 256 == 255:
            writer.checkpoint(v + 1, [])
    writer.checkpoint(videos, [])
    writer.finish()
    import torch

    from totobench.model.tokenizer import TokenizerConfig, VisualTokenizer
    from totobench.model.tokens import tokenizer_sha256
    torch.manual_seed(0)  # a random-init tokenizer: the checkpoint and the random-init baseline need one
    tok = VisualTokenizer(TokenizerConfig(codebook_size=CODES, downsample=8, channels=8, max_channels=16, code_dim=8))
    tok.save(folder / "tokenizer")
    header = {"tokenizer": {"spec": f"vqvae:{folder / 'tokenizer'}", "sha256": tokenizer_sha256(tok),
                            "codebook_size": CODES, "downsample": 8},
              "codebook_size": CODES, "dtype": token_dtype(CODES).str, "resolution": 64,
              "tokens_per_frame": TOKENS_PER_FRAME, "grid": [8, 8], "frames": 8, "stride": 4,
              "shard_tokens": 1 << 24, "batch_files": 1, "world_size": 1,
              "sources": [{"path": "synthetic", "files": videos}]}
    index = write_index(folder, header, [folder / "progress.json"])
    return 2 * index["totals"]["tokens"]


def child(config: str, out: str) -> dict:
    """Run `totobench pretrain` in this process; its peak memory figures (MiB) and wall time."""
    import resource

    from totobench.cli import main
    peak_anon, done = [0], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _rss_anon_kib())
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.time()
    code = main(["pretrain", "--config", config, "--out", out])
    done.set()
    if code:
        sys.exit(f"totobench pretrain exited with {code}")
    facts = json.loads((Path(out) / "training.json").read_text())
    return {"exit": code, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_anon_mib": peak_anon[0] / 1024, "wall_s": round(time.time() - t0, 1),
            "final_train_loss": facts["final_train_loss"], "tokens_seen": facts["tokens_seen"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=16384, help="videos of the 1x corpus")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (1, 4):
            shards = Path(tmp) / f"shards_{scale}x"
            size = write_shards(shards, scale * args.videos, seed=scale)
            cfg = {**CONFIG, "data": {**CONFIG["data"], "shards": str(shards)},
                   "train": {**CONFIG["train"], "steps": args.steps}}
            path = Path(tmp) / f"{scale}x.yaml"
            path.write_text(yaml.safe_dump(cfg))
            proc = subprocess.run([sys.executable, __file__, "--child", str(path), str(Path(tmp) / f"run_{scale}x")],
                                  capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            rows.append({"scale": scale, "videos": scale * args.videos, "tokens_mib": size / 2**20,
                         **json.loads(proc.stdout.strip().splitlines()[-1])})
    print(f"{'corpus':>7} {'videos':>7} {'tokens MiB':>10} {'max RSS MiB':>11} {'peak anon MiB':>13} "
          f"{'wall s':>7} {'final loss':>10}")
    for r in rows:
        print(f"{r['scale']:>6}x {r['videos']:>7} {r['tokens_mib']:>10.1f} {r['max_rss_mib']:>11.1f} "
              f"{r['peak_anon_mib']:>13.1f} {r['wall_s']:>7} {r['final_train_loss']:>10.4f}")
    a, b = rows
    print(f"ratio 4x / 1x: max RSS {b['max_rss_mib'] / a['max_rss_mib']:.3f}, peak anonymous "
          f"{b['peak_anon_mib'] / a['peak_anon_mib']:.3f} (target <= 1.1); "
          f"corpus {b['tokens_mib'] / a['tokens_mib']:.1f}x")


if __name__ == "__main__":
    main()
