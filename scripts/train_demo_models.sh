#!/usr/bin/env bash
# Reproduces the embedded demo models in demo_models/ with our own training scripts, on a CPU.
#
# Usage: bash scripts/train_demo_models.sh [photo|fashion|distill|all]     (default: all)
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
# (c) distill: demo_models/photo_tokenizer_distilled and demo_models/fashion_ar_distilled, the 4-step decoders
#     distilled from (a) and (b) (training/distill_decoder.py, configs distill_photo.yaml / distill_fashion.yaml:
#     1000 steps each, about 10-20 min each on 1 shared thread), plus the 8-step students (500 steps, kept under runs/ for
#     the comparison), then benchmarks/distill_quality.py (the model cards' tables, about 20 min). Needs the
#     teachers in $DEST_DIR and the training images of (a) and (b) (prepared here when missing: the photo folder
#     by scripts/train_real_data_check.sh's own data step, Fashion-MNIST by training/prepare_fashion_mnist.py).
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
case "$WHAT" in photo|fashion|distill|all) ;; *) echo "usage: $0 [photo|fashion|distill|all]" >&2; exit 2 ;; esac
start=$(date +%s)

if [ "$WHAT" = photo ] || [ "$WHAT" = all ]; then  # -------------------------------------------- (a) photos
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

if [ "$WHAT" = fashion ] || [ "$WHAT" = all ]; then  # ------------------------------------------- (b) Fashion-MNIST
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
if [ "$WHAT" = distill ] || [ "$WHAT" = all ]; then  # ------------------------------------------- (c) distilled
  PHOTO=${PHOTO_OUT:-runs/demo_photo}
  FASHION=${FASHION_OUT:-runs/fashion_demo}
  if [ ! -d "$PHOTO/data/train" ]; then  # the data step of train_real_data_check.sh alone (one list of photos)
    if [ ! -d /usr/share/backgrounds/mate ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        plasma-workspace-wallpapers mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 opencv-doc
    fi
    sed -n "/<<'EOF'\$/,/^EOF\$/p" scripts/train_real_data_check.sh | sed '1d;$d' | "$PY" - "$PHOTO/data" 64 128
  fi
  if [ ! -d "$FASHION/data/train" ]; then
    if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ] \
       && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        dataset-fashion-mnist
    fi
    "$PY" -m flextok_kit.training.prepare_fashion_mnist --out "$FASHION/data" --eval-per-class 100
  fi
  photo=(-m flextok_kit.training.distill_decoder --config distill_photo teacher.path="$DEST_DIR/photo_tokenizer"
         data.path="$PHOTO/data/train")
  fashion=(-m flextok_kit.training.distill_decoder --config distill_fashion teacher.path="$DEST_DIR/fashion_ar"
           data.path="$FASHION/data/train")
  # the committed photo student: the first 1000 steps of the config's 2000-step schedule (stopped there for time),
  # i.e. a run to the step-1000 checkpoint, then a resume that ends (and exports) at 1000
  "$PY" "${photo[@]}" output_dir=runs/distill_photo_s4 debug.stop_after_steps=1000
  "$PY" "${photo[@]}" output_dir=runs/distill_photo_s4 max_steps=1000
  "$PY" "${fashion[@]}" output_dir=runs/distill_fashion_s4                                  # 1000 steps
  "$PY" "${photo[@]}" output_dir=runs/distill_photo_s8 student.num_inference_steps=8 max_steps=500
  "$PY" "${fashion[@]}" output_dir=runs/distill_fashion_s8 student.num_inference_steps=8 max_steps=500
  for pair in "runs/distill_photo_s4 $DEST_DIR/photo_tokenizer_distilled" \
              "runs/distill_fashion_s4 $DEST_DIR/fashion_ar_distilled" \
              "runs/distill_photo_s8 runs/distill_photo_s8/packaged" "runs/distill_fashion_s8 runs/distill_fashion_s8/packaged"; do
    set -- $pair
    "$PY" scripts/package_demo_model.py "$1/export" "$2"
fi
echo "done in $(( ($(date +%s) - start) / 60 )) min"
