#!/usr/bin/env bash
# The aGaussian/eChannel tables of docs/coweight.md on clutter (the app's defaults: imsize 512, learned whitening
# fitted on clutter_train with shrinkage 0.25; VGG16 unless a backbone override is passed). Run after one default
# evaluation has cached the feature maps (each run below then only re-pools, about a minute on 2 cores).
#   bash scripts/coweight_tables.sh [OUT_DIR] [extra Hydra overrides, e.g. backbone=mobilenet_v2 ...]
set -euo pipefail
out=${1:-multirun/coweight}
shift || true
py=${PYTHON:-.venv/bin/python}
extra=("$@")
ev() { local name=$1; shift; "$py" -m lightning_apps.eval -m mode=single num_vis_queries=0 "$@" "hydra.sweep.dir=$out/$name" "${extra[@]}"; }
# The baselines the paper compares with, and the full method.
ev baselines pool=spoc,crow,gem,agaussian_echannel
# Tables 1-2 / Fig. 4 structure: spatial weighting x channel weighting (alpha = 0.1).
ev spatial_x_channel pool=agaussian_echannel pool.spatial=adaptive,centred,none pool.channel=echannel,sparsity,none
# Table 1: alpha of the aGaussian centre, without channel weighting (as the paper) and with eChannel.
ev alpha pool=agaussian_echannel pool.alpha=0.05,0.1,0.5,1.0 pool.channel=none,echannel
# Without whitening (the raw descriptors) and with PCA whitening (the paper's Algorithm 1) instead of Lw.
ev no_whitening pool=spoc,crow,gem,agaussian_echannel whiten=none
ev pca_whitening pool=spoc,crow,gem,agaussian_echannel whiten=pca
for d in baselines spatial_x_channel alpha no_whitening pca_whitening; do
  echo "## $d"
  "$py" -m lightning_apps.summarize "$out/$d"
done
