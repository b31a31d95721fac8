#!/usr/bin/env bash
# The HeW/HeR tables of docs/hew-her.md on clutter (VGG16, the app's defaults: imsize 512, learned whitening
# fitted on clutter_train with shrinkage 0.25). Run after one default evaluation has cached the feature maps
# (each run below then only re-pools and re-ranks, about a minute on 2 cores).
#   bash scripts/hew_her_tables.sh [OUT_DIR] [extra Hydra overrides ...]
set -euo pipefail
out=${1:-multirun/hew_her}
shift || true
py=${PYTHON:-.venv/bin/python}
ev() { local name=$1; shift; "$py" -m lightning_apps.eval -m mode=single num_vis_queries=0 "$@" "hydra.sweep.dir=$out/$name" "${extra[@]}"; }
extra=("$@")
# Table II (both variants): SumA (= SPoC), HeW, + QE, + HeR, + QE + HeR.
ev table2_paper pool=spoc,hew rerank=none,aqe,her,qe_her
ev table2_hewr pool=hew_hewr rerank=none,aqe,her_hewr,qe_her_hewr
# The lam ablation of HeW (the default of HeWPool comes from it).
ev lam_paper pool=hew pool.lam=0.01,0.1,1,10,100
ev lam_hewr pool=hew_hewr pool.lam=0.01,0.1,1
# HeR: the k ablation (Fig. 2 of the paper) and its lam.
ev k_paper pool=hew rerank=her rerank.k=25,50,100,200,400,800
ev k_hewr pool=hew_hewr rerank=her_hewr rerank.k=25,50,100,200,400,800
ev lam_her pool=hew rerank=her rerank.lam=0.1,1,10,100
for d in table2_paper table2_hewr lam_paper lam_hewr k_paper k_hewr lam_her; do
  echo "## $d"
  "$py" -m lightning_apps.summarize "$out/$d"
done
