#!/usr/bin/env bash
# The selective-mask / embedding tables of docs/temb.md on clutter (VGG16, imsize 512; each pool fitted on
# clutter_train's database images and cached under <cache_dir>/pools). Run after one default evaluation has cached
# the feature maps; the SIFT masks are computed once per image and cached too.
#   bash scripts/temb_tables.sh [OUT_DIR] [extra Hydra overrides, e.g. backbone=mobilenet_v2 ...]
set -euo pipefail
out=${1:-multirun/temb}
shift || true
py=${PYTHON:-.venv/bin/python}
extra=("$@")
ev() { local name=$1; shift; "$py" -m lightning_apps.eval -m mode=single num_vis_queries=0 "$@" "hydra.sweep.dir=$out/$name" "${extra[@]}"; }
# Table 3 structure at 512-D: masks x {FV, VLAD, T-emb} x {sum, democratic}; the authors' post-processing only
# (their rotation + power law, no extra whitening).
ev table3 pool=fv,vlad,temb pool.mask=max,sum,sift,none pool.aggregation=sum,democratic whiten=none
# Table 4 / Fig. 4: T-emb + democratic at the paper's (d, k) for 1024, 2048 and 4096-D (every mask at 1024-D; the
# longer ones with the cheaper masks: 4096-D whitens 4224-D vectors per local feature, ~15 min a run without mask).
ev dim1024 pool=temb pool.d=64 pool.k=18 pool.mask=max,sum,sift,none whiten=none
ev dim2048 pool=temb pool.d=64 pool.k=34 pool.mask=max,sum whiten=none
ev dim4096 pool=temb pool.d=64 pool.k=66 pool.mask=max whiten=none
# The baselines beside them, without and with the app's learned whitening (Lw on clutter_train).
ev baselines pool=spoc,crow,gem whiten=none,learned
ev temb_lw pool=temb pool.mask=max,none whiten=learned
for d in table3 dim1024 dim2048 dim4096 baselines temb_lw; do
  echo "## $d"
  "$py" -m lightning_apps.summarize "$out/$d"
done
