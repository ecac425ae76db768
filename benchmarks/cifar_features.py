"""What the frozen backbone's features alone separate in the CIFAR-10 one-class protocol, per input size.

    python benchmarks/cifar_features.py --root ../shared/data/cifar10_jpeg --classes airplane cat --sizes 32 64 128

No training: each image is resized to the size, its last-stage features are averaged over the
image, and a test image scores the mean cosine distance to its 2 nearest training images of
the class (kNN) or its Mahalanobis distance to their Gaussian. The question it answers: how
much of the gap between our CIFAR-10 numbers and the paper's comes from feeding an ImageNet
CNN 32x32 images (the paper's size as written), rather than from the reconstruction or its
training budget. Writes ``cifar_features.json`` and ``cifar_features.md``, merging rows by
class and size with those already there (same backbone and seed), so classes and sizes can be
run in several calls.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# benchmarks/ is on sys.path when a script runs
from provenance import git_commit, machine_description, short_commit, write_results

HERE = Path(__file__).resolve().parent


def pooled_features(backbone, images: np.ndarray, size: int, batch_size: int = 256) -> np.ndarray:
    """(N, C) mean of the last stage's features of uint8 (N, 32, 32, 3) images resized to ``size``."""
    import torch
    import torch.nn.functional as F

    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float() / 255
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = ((x - backbone.mean) / backbone.std).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out.append(backbone.body(x)[-1].mean((2, 3)))
    return torch.cat(out).double().numpy()


def knn_and_gaussian_scores(train: np.ndarray, test: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    unit_train = train / np.linalg.norm(train, axis=1, keepdims=True)
    unit_test = test / np.linalg.norm(test, axis=1, keepdims=True)
    knn = np.sort(1 - unit_test @ unit_train.T, axis=1)[:, :k].mean(1)
    centred = test - train.mean(0)
    precision = np.linalg.inv(np.cov(train.T) + 0.01 * np.eye(train.shape[1]))  # shrunk: C > 5000 / 2 is close
    return knn, np.einsum("ij,jk,ik->i", centred, precision, centred)


def markdown(rows: list[dict]) -> str:
    """One row per class and size, then the mean over the classes run at each size."""
    lines = ["| class | input size | kNN (k = 2) | Gaussian |", "|---|---|---|---|"]
    lines += [f"| {r['class']} | {r['size']}x{r['size']} | {100 * r['knn_auroc']:.1f} | "
              f"{100 * r['gaussian_auroc']:.1f} |" for r in rows]
    sizes = sorted({r["size"] for r in rows})
    means = ["| input size | classes | kNN (k = 2), mean | Gaussian, mean |", "|---|---|---|---|"]
    for size in sizes:
        at = [r for r in rows if r["size"] == size]
        means.append(f"| {size}x{size} | {len(at)} | {100 * np.mean([r['knn_auroc'] for r in at]):.1f} | "
                     f"{100 * np.mean([r['gaussian_auroc'] for r in at]):.1f} |")
    caveat = ""
    if len({frozenset(r["class"] for r in rows if r["size"] == size) for size in sizes}) > 1:
        caveat = ("\nThe sizes were run on different sets of classes (the classes column): compare their means "
                  "only over the classes they share.\n")
    return "\n".join(lines) + "\n\n" + "\n".join(means) + "\n" + caveat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="CIFAR-10 (pickles or class folders)")
    parser.add_argument("--classes", nargs="+", help="class names (default: all)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    import torch
    from sklearn.metrics import roc_auc_score

    from adtr.data import load_cifar, one_class_split
    from adtr.models.backbone import FrozenBackbone

    train, test = load_cifar(args.root, "train"), load_cifar(args.root, "test")
    backbone = FrozenBackbone(args.backbone, "packaged", (0, 1, 2, 3, 4), 4)
    settings = {"backbone": args.backbone, "seed": args.seed}
    json_path = args.out / "cifar_features.json"
    saved = json.loads(json_path.read_text()) if json_path.exists() else {"meta": {}, "rows": []}
    same = all(saved["meta"].get(k) == v for k, v in settings.items())
    # Rows of earlier calls keep the commit and machine they ran on (older files name them once, in meta).
    rows = {(r["class"], r["size"]): {"commit": saved["meta"].get("commit"), "machine": saved["meta"].get("machine"),
                                      **r} for r in saved["rows"]} if same else {}  # others are replaced
    commit, machine = git_commit(), f"{torch.get_num_threads()} CPU threads, {machine_description()}"
    for name in args.classes or list(train.classes):
        split = one_class_split(train, test, name, n_anomalous=1000, seed=args.seed)
        for size in args.sizes:
            t0 = time.perf_counter()
            knn, gauss = knn_and_gaussian_scores(pooled_features(backbone, split.train, size),
                                                 pooled_features(backbone, split.test, size))
            rows[name, size] = {"class": name, "size": size, "knn_auroc": roc_auc_score(split.test_labels, knn),
                                "gaussian_auroc": roc_auc_score(split.test_labels, gauss),
                                "seconds": round(time.perf_counter() - t0, 1), "commit": commit,
                                "machine": machine}
            print(rows[name, size], flush=True)
    order = {c: i for i, c in enumerate(train.classes)}
    rows = [rows[key] for key in sorted(rows, key=lambda key: (order.get(key[0], len(order)), key[0], key[1]))]
    commits = sorted({short_commit(r["commit"]) for r in rows if r.get("commit")})
    machines = sorted({r["machine"] for r in rows if r.get("machine")})
    meta = {"commit": commit, "root": str(args.root), **settings, "machine": machine}
    table = ("# CIFAR-10 one-class: what the frozen features separate, image AUROC (%)\n\n"
             f"Commit{'s' if len(commits) > 1 else ''} {', '.join(f'`{c}`' for c in commits)}, {args.backbone} "
             f"with packaged weights, on {'; '.join(machines)}. "
             "No training: last-stage features averaged over the image (resized bilinearly from 32x32); "
             "kNN: mean cosine distance to the 2 nearest training images of the class; Gaussian: Mahalanobis "
             f"distance (covariance + 0.01 I). Test: the class's 1000 test images + 1000 of the other nine "
             f"(seed {args.seed}), as in `cifar10.md`.\n\n" + markdown(rows))
    write_results(args.out, "cifar_features", {"meta": meta, "rows": rows}, table)


if __name__ == "__main__":
    main()
