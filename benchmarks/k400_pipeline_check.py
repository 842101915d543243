"""Is the Kinetics task's input able to carry motion? Pixel-level check of the k400 clips.

Takes the clips exactly as the k400 tasks read them (`ClipViews`: 8 frames every 4th, resized and
cropped to 64 px; one random training clip per train video, the first evaluation clip per val
video), turns each into the absolute differences of consecutive frames average-pooled to 8x8
cells, and fits a logistic regression. Far above chance (0.10) means the clips and labels are
right and the classes need motion; a backbone whose probes sit at chance has not learned it.

    .venv/bin/python benchmarks/k400_pipeline_check.py
"""

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from totobench.data.kinetics import KineticsIndex
from totobench.data.world import ensure_data_world
from totobench.tasks.kinetics import ClipViews


def feats(split, training):
    idx = KineticsIndex(ensure_data_world() / "kinetics400", split, min_frames=8)
    views = ClipViews(idx, 8, 4, 64, training, 1, 1, 0)
    X, y = [], []
    for i in range(len(views)):
        s = views[i]
        f = s["frames"].float()                       # [T, 3, 64, 64]
        d = (f[1:] - f[:-1]).abs().mean(1)            # [T-1, 64, 64]
        X.append(torch.nn.functional.avg_pool2d(d, 8).flatten().numpy()); y.append(s["label"])
    return np.array(X), np.array(y)


def main():
    Xt, yt = feats("train", True)
    Xv, yv = feats("val", False)
    m = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(Xt, yt)
    print("k400 task clips, |frame differences| pooled to 8x8, logistic regression val top-1:", f"{(m.predict(Xv) == yv).mean():.3f}", f"(chance 0.10; {len(yt)} train / {len(yv)} val clips)")


if __name__ == "__main__":
    main()
