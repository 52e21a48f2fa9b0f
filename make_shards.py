"""Pack an ImageFolder or a file list into WebDataset-format tar shards for `--data_path`.

    python make_shards.py --data_path /datasets/imagenet/train --output_dir /datasets/imagenet-shards/train
    python make_shards.py --data_path /datasets/imagenet/val --output_dir /datasets/imagenet-shards/val
    python make_shards.py --data_path /data --file_list train.txt --output_dir /shards/train --prefix train

Each sample becomes ``<key>.<original extension>`` (the encoded file, byte for byte: nothing is decoded or
re-encoded) and ``<key>.cls`` (its integer label); keys are the sample's position in the shuffled order.
Every shard gets a small ``<shard>.idx.json`` so readers need not walk the tar headers. Files that cannot be
read are reported and left out; files that are not valid images are copied as they are and skipped (and
counted) at training time, like in an ImageFolder. Prints the `--data_path` pattern to train with.
"""
import argparse
import io
import logging
import os
import random
import sys
import tarfile
from collections.abc import Sequence
from typing import Optional

from util import args as cli
from util.data import read_file_list, scan_image_folder
from util.shards import scan_shard, write_index

logger = logging.getLogger("maskalign.data")


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("Pack images into WebDataset tar shards")
    parser.add_argument("--data_path", required=True, help="ImageFolder root (root/<class>/<image>), or the "
                                                           "root the --file_list paths are relative to")
    parser.add_argument("--file_list", default=None, help="text file of 'relative/path label' lines")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--prefix", default="shard", help="shard names: <prefix>-000000.tar, ...")
    parser.add_argument("--samples_per_shard", type=int, default=1000,
                        help="ImageNet-1k train at 1000 gives 1282 shards of ~110 MB")
    parser.add_argument("--no_shuffle", action="store_false", dest="shuffle",
                        help="keep the listing order (default: one seeded shuffle, so each shard mixes classes "
                             "as WebDataset streaming readers expect)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: same input, same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Sequence[tuple[str, int]], output_dir: str, prefix: str = "shard",
                 samples_per_shard: int = 1000) -> tuple[list[str], int]:
    """Write the shards (and their indexes); returns (shard paths, files left out as unreadable)."""
    os.makedirs(output_dir, exist_ok=True)
    paths, skipped, digits = [], 0, max(6, len(str(len(samples) // samples_per_shard)))
    for first in range(0, len(samples), samples_per_shard):
        path = os.path.join(output_dir, f"{prefix}-{first // samples_per_shard:0{digits}d}.tar")
        partial = path + ".partial"
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, (source, label) in enumerate(samples[first:first + samples_per_shard], start=first):
                try:
                    with open(source, "rb") as f:
                        data = f.read()
                except OSError as e:
                    logger.warning("Left out %s: %s", source, e)
                    skipped += 1
                    continue
                ext = os.path.splitext(source)[1].lstrip(".").lower() or "jpg"
                _add(tar, f"{key:09d}.{ext}", data)
                _add(tar, f"{key:09d}.cls", str(label).encode())
        os.replace(partial, path)  # a shard that exists is complete
        write_index(path, scan_shard(path))
        paths.append(path)
        logger.info("%s: %d samples", path, min(samples_per_shard, len(samples) - first))
    return paths, skipped


def brace_pattern(paths: Sequence[str]) -> str:
    """'dir/prefix-{000000..000127}.tar' for the shards write_shards made."""
    if len(paths) == 1:
        return paths[0]
    first, last = (os.path.basename(p)[:-len(".tar")].rsplit("-", 1) for p in (paths[0], paths[-1]))
    return os.path.join(os.path.dirname(paths[0]), f"{first[0]}-{{{first[1]}..{last[1]}}}.tar")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.samples_per_shard < 1:
        raise SystemExit("error: --samples_per_shard must be >= 1")
    try:
        samples = read_file_list(args.file_list, args.data_path) if args.file_list \
            else scan_image_folder(args.data_path)[0]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    if args.shuffle:
        random.Random(args.seed).shuffle(samples)
    paths, skipped = write_shards(samples, args.output_dir, args.prefix, args.samples_per_shard)
    print(f"{len(samples) - skipped} samples in {len(paths)} shards ({skipped} unreadable files left out); "
          f"train with --data_path '{brace_pattern(paths)}' (or --data_path {args.output_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
