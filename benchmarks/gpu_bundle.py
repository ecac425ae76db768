"""Pack what ``benchmarks/gpu.sh`` needs for a device machine that can fetch nothing.

The device tool sends the checkout (64 MiB in all) and nothing beside it: not
``../shared/data``, not this virtual environment. Its python has torch, timm, scipy,
scikit-learn and the rest of our needs, but not the package that ships the backbone's
ImageNet weights. This writes into an ignored folder of the checkout (default ``.gpu``):

- ``mvtec_ad/CATEGORY``: the category's images and masks already at the model's input
  size, resized by the loader's own functions (bilinear images, nearest-neighbour masks)
  and saved as PNG, which is lossless: about a quarter of the originals' bytes. Every
  file is read back through the loader and must give the same tensor as its original,
  so the fit there sees the pixels it would see here.
- ``site/``: the weights package, importable with ``PYTHONPATH``.

and prints the device call that runs the GPU check on it. Building the bundle takes
seconds and no device time; the check itself then needs one call.

    python benchmarks/gpu_bundle.py --root ../shared/data/mvtec_ad
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def resized_copy(source: Path, target: Path, size: int, mask: bool) -> None:
    """Write what the loader reads from ``source`` at ``size`` as a PNG at ``target``, and check
    that it reads the same tensor back (raises ``AdtrError`` naming the file if not)."""
    import torch

    from adtr.data.images import image_to_tensor, read_image, read_mask
    from adtr.errors import file_error

    target.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        reference = read_mask(source, size)
        Image.fromarray(reference.numpy().astype(np.uint8) * 255).save(target)
        same = torch.equal(read_mask(target, size), reference)
    else:
        reference = image_to_tensor(read_image(source), size)  # (3, S, S), uint8 values / 255
        pixels = reference.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(target)
        same = torch.equal(image_to_tensor(read_image(target), size), reference)
    if not same:
        raise file_error(source, f"its {size}x{size} copy reads back differently from the original")


def bundle_category(root: Path, category: str, out: Path, size: int) -> int:
    """Resized copies of one MVTec category under ``out/category``, same layout; returns the file count."""
    from adtr.data import index_mvtec

    def target(path: Path) -> Path:  # MVTec's layout: <split or ground_truth>/<type>/<name>
        return (out / category / Path(*path.parts[-3:])).with_suffix(".png")

    count = 0
    for split in ("train", "test"):
        for sample in index_mvtec(root, category, split):
            resized_copy(sample.image, target(sample.image), size, mask=False)
            count += 1
            if sample.mask is not None:
                resized_copy(sample.mask, target(sample.mask), size, mask=True)
                count += 1
    return count


def copy_weights_package(backbone: str, site: Path) -> Path:
    """Copy the Python package that ships ``backbone``'s weights into ``site``; returns its new folder."""
    from adtr.models.backbone import packaged_weights_path

    package = packaged_weights_path(backbone).parent.parent  # <package>/models/<file>.pth
    target = site / package.name
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def is_ignored(path: Path) -> bool:
    """Whether git ignores ``path`` in this checkout (so the bundle travels only when carried)."""
    try:
        done = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO, capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="MVTec AD root folder")
    parser.add_argument("--categories", nargs="+", default=["bottle"], help="default: bottle, the one gpu.sh fits")
    parser.add_argument("--out", type=Path, default=REPO / ".gpu", help="bundle folder (default .gpu in the checkout)")
    parser.add_argument("--image-size", type=int, default=256, help="the model's input side (default 256)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="whose packaged weights to carry")
    args = parser.parse_args()

    from adtr.errors import AdtrError

    partial = args.out.with_name(args.out.name + ".partial")  # the bundle appears whole or not at all
    shutil.rmtree(partial, ignore_errors=True)
    try:
        files = sum(bundle_category(args.root, c, partial / "mvtec_ad", args.image_size) for c in args.categories)
        package = copy_weights_package(args.backbone, partial / "site")
    except AdtrError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise SystemExit(f"error: {exc}") from None
    shutil.rmtree(args.out, ignore_errors=True)
    partial.rename(args.out)
    print(f"{args.out}: {files} images and masks of {', '.join(args.categories)} at {args.image_size}x"
          f"{args.image_size} ({folder_mib(args.out / 'mvtec_ad'):.1f} MiB), weights package {package.name} "
          f"({folder_mib(args.out / 'site'):.1f} MiB); the device tool carries 64 MiB with the checkout")
    try:
        name = args.out.resolve().relative_to(REPO).as_posix()
    except ValueError:
        print("The device tool sends only the checkout: give --out a folder inside it.")
        return
    if not is_ignored(args.out):
        print(f"Ignore it first, so it travels only when carried: echo /{name}/ >> .git/info/exclude")
    print("Then one device call (gpu.sh is sized for under 8 minutes on one GPU; its results come back in $OUT):\n"
          f'  run(command="PYTHONPATH=src:{name}/site PY=python3 bash benchmarks/gpu.sh {name}/mvtec_ad $OUT", '
          f'carry=["{name}"], timeout_s=560)')


if __name__ == "__main__":
    main()
