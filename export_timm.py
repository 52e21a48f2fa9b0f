"""Export the student of a pre-training checkpoint (ours, MAE's or the reference MaskAlign code's) as timm weights.

    python export_timm.py out/ma_b16/checkpoint-199.pth exported/
    # -> exported/vit_base_patch16_224_maskalign.{pth,safetensors} + config.json, loadable with
    timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file='exported/vit_base_patch16_224_maskalign.safetensors',
                                                  num_classes=0))
"""
import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Optional

from util.args import ParseKwargs, new_parser
from util.checkpoint import CheckpointError
from util.pretrained import export_timm


def get_args_parser() -> argparse.ArgumentParser:
    parser = new_parser("Export a MaskAlign student as timm weights")
    parser.add_argument("checkpoint", help="pre-training checkpoint (.pth) or state dict (.safetensors)")
    parser.add_argument("output_dir")
    parser.add_argument("--model", default=None,
                        help="timm model name (default: from the checkpoint's args, else from its width/depth)")
    parser.add_argument("--model_kwargs", nargs="*", action=ParseKwargs, default={}, metavar="KEY=VALUE",
                        help="extra timm.create_model arguments for a non-standard student, e.g. depth=6")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    try:
        paths = export_timm(args.checkpoint, args.output_dir, args.model, **args.model_kwargs)
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
