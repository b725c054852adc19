#!/usr/bin/env bash
# All three training stages end to end on synthetic images, tiny models, CPU (3.5 minutes on 2 shared cores: VAE 2 min,
# tokenizer 1.2 min, tokenize 10 s, AR 4 s, plus a few seconds of start-up per stage):
# VAE -> tokenizer -> tokenize_dataset -> class-conditional AR, then a FlexTokPipeline folder with all of them.
# Usage: bash scripts/train_tiny_pipeline.sh [DATA_FOLDER]
#   env: OUT, PYTHON (default .venv/bin/python, else python3: scripts/_python.sh), NPROC, VAE_STEPS, TOK_STEPS,
#        AR_STEPS, FSQ_LEVELS
# With NPROC=2 the tokenizer stage runs as 2 CPU processes (gloo DDP).
# The tokenizer uses FSQ levels [8,5,5,5] (a 1000-word vocabulary, as the Fashion-MNIST demo) instead of
# tokenizer_tiny's 64,000 words: with those the tiny AR model was 8.3M parameters, almost all embedding and output
# head, and its 300 steps took 2.5 minutes instead of 4 s. FSQ_LEVELS=[8,8,8,5,5,5] restores the config's vocabulary.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh   # PY: $PYTHON, else .venv/bin/python, else python3
require_flextok_kit
OUT=${OUT:-runs/tiny}
NPROC=${NPROC:-1}
VAE_STEPS=${VAE_STEPS:-300}
TOK_STEPS=${TOK_STEPS:-500}
AR_STEPS=${AR_STEPS:-300}
FSQ_LEVELS=${FSQ_LEVELS:-[8,5,5,5]}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=${1:-$OUT/data}
if [ -z "${1:-}" ]; then
  "$PY" - "$DATA" <<'EOF'
import sys
import numpy as np
from flextok_kit.training.data import write_image_folder
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:64, 0:64] / 64
imgs, labels = [], []
for i in range(192):
    c = i % 3
    a = np.zeros((64, 64, 3), np.float32)
    a[..., c] = 220 * xx
    a[..., (c + 1) % 3] = 160 * yy
    cx, cy = rng.uniform(0.25, 0.75, 2)
    a[(xx - cx) ** 2 + (yy - cy) ** 2 < 0.02] = (255, 255, 40)
    imgs.append(np.clip(a + rng.normal(0, 4, a.shape), 0, 255).astype(np.uint8))
    labels.append(c)
write_image_folder(sys.argv[1], imgs, labels, ["red", "green", "blue"])
EOF
fi
if [ "$NPROC" -gt 1 ]; then
  LAUNCH=("$PY" -m accelerate.commands.launch --config_file training/accelerate_configs/cpu_2proc.yaml
          --num_processes "$NPROC" -m)
else
  LAUNCH=("$PY" -m)
fi
"$PY" -m flextok_kit.training.train_vae --config vae_tiny data.path="$DATA" output_dir="$OUT/vae" max_steps="$VAE_STEPS"
"${LAUNCH[@]}" flextok_kit.training.train_tokenizer --config tokenizer_tiny data.path="$DATA" \
  vae.path="$OUT/vae/export" output_dir="$OUT/tokenizer" max_steps="$TOK_STEPS" model.fsq_levels="$FSQ_LEVELS"
"$PY" -m flextok_kit.training.tokenize_dataset --config tokenize pipeline="$OUT/tokenizer/export" \
  data.path="$DATA" data.resolution=64 views=4 data.crop=random_resized data.hflip=0.5 output_dir="$OUT/tokens"
"$PY" -m flextok_kit.training.train_ar --config ar_tiny tokens="$OUT/tokens" output_dir="$OUT/ar" max_steps="$AR_STEPS" \
  export.pipeline="$OUT/tokenizer/export" export.pipeline_dir="$OUT/pipeline"
echo "pipeline with VAE, tokenizer and AR model: $OUT/pipeline"
