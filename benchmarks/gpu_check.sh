#!/usr/bin/env bash
# Every GPU figure of the README's Speed section in one run (expected: about 5 minutes on an H100/H200, compile
# warm-up included): ours bare step and through engine.fit, eager and compiled, MFU, FD, ours in fp16, the reference.
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine, from anywhere in the repo
#   bash benchmarks/gpu_check.sh --device cpu --smoke  # the same script on CPU with tiny settings (a logic check)
#
# Needs torch, torchvision, timm, open_clip_torch and, for the reference figure, transformers. A machine that
# cannot reach a package index gets open_clip as wheels carried in the git-ignored .whl/ folder, downloaded
# beforehand on a machine that can (open_clip_torch's dependencies that such a machine usually lacks: ftfy, wcwidth):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       open_clip_torch==3.3.0 ftfy wcwidth
# This script then installs them with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and puts
# /tmp/site on PYTHONPATH. The reference source (github.com/OpenDriveLab/maskalign) goes, extracted, into the
# git-ignored .ref/maskalign/ (e.g. `git -C <its git dir> archive HEAD | tar -x -C .ref/maskalign`); without it
# the reference figure is skipped. Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
smoke=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--device cuda|cpu] [--smoke]" >&2; exit 2 ;;
  esac
done
py="${PYTHON:-python}"
export HF_HUB_OFFLINE=1

if ! "$py" -c "import open_clip" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "open_clip_torch is not installed and .whl/ holds no wheels: see the top of $0" >&2
    exit 1
  fi
fi

ref_dir=.ref/maskalign
ref=()
if [ -f "$ref_dir/models_pretrain.py" ] && "$py" -c "import transformers" 2>/dev/null; then
  ref=(--ref "$ref_dir")
else
  echo "note: no reference source in $ref_dir (or no transformers): the reference figure is skipped"
fi

if [ "$smoke" = 1 ]; then
  size=(--batch_size 2 --warmup 1 --steps 1 --num_workers 0 --model maskalign_vit_tiny_patch16
        --model_kwargs depth=2 --teacher timm:vit_tiny_patch16_224)
else
  size=(--batch_size 128 --warmup 3 --steps 20 --num_workers 8)
fi
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$py" -c "import torch, timm, open_clip; print('torch', torch.__version__, 'timm', timm.__version__, 'open_clip', open_clip.__version__)"

# ViT-B/16 student + CLIP-B/16 teacher at mask 0.7: bf16 (CUDA) eager and compiled, each bare and through the
# loop, FD eager, ours in the reference's precision and the reference (fp16 + GradScaler on CUDA). Every figure
# is for the reference's alignment (--align official), whether or not the reference source is there to compare.
"$py" benchmarks/bench_pretrain.py --device "$device" "${size[@]}" --align official --compile --loop "${ref[@]}"
