"""Downloads of the public datasets, only when a config allows it and the network answers.

``python -m casd_ray.data.download --download-fashion-mnist DIR`` is what ``make data`` runs where
Debian's ``dataset-fashion-mnist`` cannot be installed. Every failure is one DataError line
that says where to copy the files by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from casd_ray.data.readers import CIFAR, FASHION_MNIST_FILES, load_fashion_mnist
from casd_ray.errors import DataError


def download_fashion_mnist(root: str | Path) -> Path:
    """Fetch the four idx .gz files (md5-checked by torchvision) straight into ``root``."""
    root = Path(root)
    if all((root / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair):
        return root  # nothing to fetch: skip importing torchvision (seconds)
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_url

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"data.root {root}: cannot create it for the download ({err})") from None
    for filename, md5 in FashionMNIST.resources:
        if (root / filename).is_file():
            continue
        errors = []
        for mirror in FashionMNIST.mirrors:
            try:
                download_url(mirror + filename, root=str(root), filename=filename, md5=md5)
                break
            except Exception as err:  # network errors come in many types; report the first line
                errors.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
        else:
            raise DataError(
                f"data.root {root}: downloading Fashion-MNIST {filename} failed "
                f"({'; '.join(errors)}); copy the four idx .gz files there by hand"
            )
    return root


def download_cifar(root: Path, dataset: str) -> None:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if dataset == "cifar10" else CIFAR100
    try:
        cls(root=str(root), train=True, download=True)  # fetches and extracts both splits
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"data.root {root}: downloading {CIFAR[dataset]['human']} failed ({msg}); copy "
            f"the python version to {root / CIFAR[dataset]['folder']}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m casd_ray.data.download", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--download-fashion-mnist", metavar="DIR", required=True,
                        help="fetch the four Fashion-MNIST idx .gz files into DIR")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        root = download_fashion_mnist(args.download_fashion_mnist)
        load_fashion_mnist(root)  # verify what landed there
    except DataError as err:
        print(f"casd-ray: error: {err}", file=sys.stderr)
        return 2
    print(f"Fashion-MNIST ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
