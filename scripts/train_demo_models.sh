#!/usr/bin/env bash
# Reproduces the embedded demo models in demo_models/ with our own training scripts, on a CPU.
#
# Usage: bash scripts/train_demo_models.sh [photo|fashion|all]     (default: all)
#   env: PYTHON (default .venv/bin/python, else python3: scripts/_python.sh), PHOTO_OUT=runs/demo_photo,
#        FASHION_OUT=runs/fashion_demo, DEST_DIR=demo_models
#
# (a) demo_models/photo_tokenizer: tiny 16-channel /8 VAE + tiny FlexTok tokenizer (16 registers) on random crops
#     of natural photos from Debian packages (the issue-5 real-data check, scripts/train_real_data_check.sh),
#     RES=64, REPA=effnet-lite0, seed 0; configs training/configs/vae_tiny.yaml + tokenizer_tiny.yaml; VAE 1000
#     steps; tokenizer 2000 steps (cosine over 2000), resumed to 4000 (cosine over 4000 from there), resumed to
#     10000 (cosine over 10000 from there). The staged schedule is what the committed weights went through; keep it
#     to reproduce them. About 90 minutes on 2 cores.
# (b) demo_models/fashion_ar: Fashion-MNIST (Debian dataset-fashion-mnist, 60k training items padded to 32 px)
#     -> fashion_vae.yaml (1200 steps) -> fashion_tokenizer.yaml (16 registers, FSQ [8,5,5,5]) -> fashion_tokenize.yaml
#     -> fashion_ar.yaml (class-conditional FlexTokAR, 10 classes), seed 0. About 55 minutes of training on 2 cores
#     (VAE 10, tokenizer 17, tokenize 2.5, AR 23), plus about 25 minutes of evaluation.
#
# Both are packaged with scripts/package_demo_model.py (float16 storage; the model card README.md is kept) and
# evaluated with `flextok eval` on held-out data (the numbers of the model cards).
# Bit-identical results need the same torch build and thread count (OMP_NUM_THREADS=1 is set here).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh   # PY: $PYTHON, else .venv/bin/python, else python3
require_flextok_kit
WHAT=${1:-all}
DEST_DIR=${DEST_DIR:-demo_models}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case "$WHAT" in photo|fashion|all) ;; *) echo "usage: $0 [photo|fashion|all]" >&2; exit 2 ;; esac
start=$(date +%s)

if [ "$WHAT" != fashion ]; then  # ---------------------------------------------------------------- (a) photos
  OUT=${PHOTO_OUT:-runs/demo_photo}
  for tok_steps in 2000 4000 10000; do   # each run resumes the tokenizer from the previous one's last checkpoint
    OUT="$OUT" RES=64 VAE_STEPS=1000 TOK_STEPS=$tok_steps REPA=effnet-lite0 EVAL_IMAGES=128 PYTHON="$PY" \
      bash scripts/train_real_data_check.sh
  done
  "$PY" scripts/package_demo_model.py "$OUT/tokenizer/export" "$DEST_DIR/photo_tokenizer"
  "$PY" -m flextok_kit.cli eval "$OUT/data/eval" --model "$DEST_DIR/photo_tokenizer" --size 64 --fit resize \
    --guidance 1 3 --features effnet-lite0 --kid-subset-size 100 --json "$OUT/eval_demo.json" \
    --plot "$OUT/eval_demo.png"
fi

if [ "$WHAT" != photo ]; then  # ---------------------------------------------------------------- (b) Fashion-MNIST
  OUT=${FASHION_OUT:-runs/fashion_demo}
  if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ] \
     && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      dataset-fashion-mnist
  fi
  [ -d "$OUT/data/eval" ] || "$PY" -m flextok_kit.training.prepare_fashion_mnist --out "$OUT/data" --eval-per-class 100
  "$PY" -m flextok_kit.training.train_vae --config fashion_vae data.path="$OUT/data/train" output_dir="$OUT/vae"
  "$PY" -m flextok_kit.training.train_tokenizer --config fashion_tokenizer vae.path="$OUT/vae/export" \
    data.path="$OUT/data/train" output_dir="$OUT/tokenizer"
  "$PY" -m flextok_kit.training.tokenize_dataset --config fashion_tokenize pipeline="$OUT/tokenizer/export" \
    data.path="$OUT/data/train" output_dir="$OUT/tokens"
  "$PY" -m flextok_kit.training.train_ar --config fashion_ar tokens="$OUT/tokens" output_dir="$OUT/ar" \
    export.pipeline="$OUT/tokenizer/export"
  "$PY" scripts/package_demo_model.py "$OUT/ar/export_pipeline" "$DEST_DIR/fashion_ar"
  # model card numbers on data/eval (1000 test items, 100 per class, never trained on): reconstruction, and
  # generation (500 samples, 50 per class) against the same items
  "$PY" -m flextok_kit.cli eval "$OUT/data/eval" --model "$DEST_DIR/fashion_ar" --size 32 --guidance 1 3 \
    --features effnet-lite0 --kid-subset-size 500 --json "$OUT/eval_recon.json" --plot "$OUT/eval_recon.png"
  "$PY" -m flextok_kit.cli eval --reference "$OUT/data/eval" --model "$DEST_DIR/fashion_ar" --size 32 \
    --num-samples 500 --ar-guidance 3 --gen-guidance 3 --features effnet-lite0 --kid-subset-size 250 \
    --json "$OUT/eval_gen.json" --plot "$OUT/eval_gen.png"
fi
echo "done in $(( ($(date +%s) - start) / 60 )) min"
