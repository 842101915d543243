"""Does each token's feature say whether its place changed since the previous frame?

The Kinetics classes of the data world differ only in motion, and a probe can only read motion
from features that know what changed between frames. This fits, for MODEL and random-init:MODEL
side by side, a logistic regression per layer from a token's feature (frames 1..) to "its token
id differs from the one at the same place in the previous frame", on half of the k400 val clips,
and prints the balanced accuracy (mean of the two per-class recalls; 0.5 = no information) on the
other half. Labels come from the tokenizer, not from annotations.

    .venv/bin/python benchmarks/change_readout.py [--model toto-tiny] [--clips 120]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from totobench.data.kinetics import KineticsIndex
from totobench.data.world import ensure_data_world
from totobench.model import load_backbone
from totobench.model.sequence import build_batch
from totobench.tasks.kinetics import ClipViews


def layer_features(backbone, frames: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """frames float [B, T, 3, R, R] -> (per layer [B, T, hw, D] features, changed mask [B, T, hw])."""
    ids = backbone.tokenize(frames)
    B, T, hw = ids.shape
    with torch.no_grad():  # the extractor's layout: [video start, frame 0 tokens, ...]
        hidden = backbone.model.forward_intermediates(build_batch(ids, "video", backbone.config),
                                                      list(range(backbone.config.n_layers)))
    changed = torch.zeros(B, T, hw, dtype=torch.bool)
    changed[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return [h[:, 1:].reshape(B, T, hw, -1).float() for h in hidden], changed


def balanced_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    return 0.5 * (float((predicted[truth] == 1).mean()) + float((predicted[~truth] == 0).mean()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toto-tiny")
    parser.add_argument("--clips", type=int, default=120, help="k400 val clips (half fit, half scored)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    first = load_backbone(args.model)
    c = first.config
    index = KineticsIndex(ensure_data_world() / "kinetics400", "val", min_frames=c.num_frames)
    views = ClipViews(index, c.num_frames, c.frame_stride, c.resolution, False, 1, 1, 0)
    step = max(1, len(views) // args.clips)
    frames = torch.stack([views[i]["frames"] for i in range(0, len(views), step)][:args.clips]).float() / 255
    half = len(frames) // 2
    print(f"{len(frames)} k400 val clips ({half} fit, {len(frames) - half} scored), {c.num_frames} frames every "
          f"{c.frame_stride}, {c.resolution} px; balanced accuracy of 'token changed since the previous frame'")
    names = (args.model, f"random-init:{args.model}")
    rows = {}
    for name in names:
        backbone = first if name == args.model else load_backbone(name)
        parts = [layer_features(backbone, batch) for batch in frames.split(20)]
        changed = torch.cat([p[1] for p in parts])[:, 1:]
        print(f"{name}: {changed.float().mean():.1%} of the tokens of frames 1.. changed", flush=True)
        scores = []
        for layer in range(c.n_layers):
            x = torch.cat([p[0][layer] for p in parts])[:, 1:]
            fit_x, fit_y = x[:half].reshape(-1, x.shape[-1]).numpy(), changed[:half].reshape(-1).numpy()
            test_x, test_y = x[half:].reshape(-1, x.shape[-1]).numpy(), changed[half:].reshape(-1).numpy()
            scaler = StandardScaler().fit(fit_x)
            clf = LogisticRegression(C=1.0, max_iter=300, class_weight="balanced").fit(scaler.transform(fit_x), fit_y)
            scores.append(balanced_accuracy(clf.predict(scaler.transform(test_x)), test_y))
        rows[name] = scores
    print(f"{'layer':<28}" + "".join(f"{layer:>7}" for layer in range(c.n_layers)))
    for name, scores in rows.items():
        print(f"{name:<28}" + "".join(f"{s:7.3f}" for s in scores))


if __name__ == "__main__":
    main()
