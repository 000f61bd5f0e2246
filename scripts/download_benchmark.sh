#!/usr/bin/env bash
# Fetch a scene-classification benchmark into DIR, laid out as its config expects.
#   bash scripts/download_benchmark.sh NAME DIR      NAME: ucm | eurosat | eurosat_ms | nwpu_resisc45 | patternnet | whu_rs19
# Where the authors publish a direct archive it is downloaded and unpacked; where they publish only
# through cloud drives or portals, the script says where to get it and where to put it.
set -euo pipefail
name=${1:?usage: download_benchmark.sh NAME DIR}
dir=${2:?usage: download_benchmark.sh NAME DIR}
mkdir -p "$dir"
fetch() {  # URL ZIP
  if [ ! -f "$dir/$2" ]; then
    curl -fL --retry 3 -o "$dir/$2.partial" "$1"
    mv "$dir/$2.partial" "$dir/$2"  # a killed download never looks complete
  fi
  unzip -q -n "$dir/$2" -d "$dir"
}
case "$name" in
  ucm)  # Yang & Newsam 2010; configs/ucm.yaml reads data/UCMerced_LandUse/Images
    fetch http://weegee.vision.ucmerced.edu/datasets/UCMerced_LandUse.zip UCMerced_LandUse.zip ;;
  eurosat)  # Helber et al. 2019, RGB; configs/eurosat.yaml reads data/EuroSAT/2750
    fetch https://madm.dfki.de/files/sentinel/EuroSAT.zip EuroSAT.zip
    [ -d "$dir/EuroSAT" ] || { mkdir -p "$dir/EuroSAT" && mv "$dir/2750" "$dir/EuroSAT/"; } ;;
  eurosat_ms)  # 13 bands; configs/eurosat_ms.yaml reads data/EuroSAT_MS
    fetch https://madm.dfki.de/files/sentinel/EuroSATallBands.zip EuroSATallBands.zip
    src=$(find "$dir" -type d -name tif | head -n 1)
    [ -d "$dir/EuroSAT_MS" ] || mv "$src" "$dir/EuroSAT_MS" ;;
  nwpu_resisc45)
    echo "NWPU-RESISC45 (Cheng et al. 2017) is published through the authors' cloud drive (see the paper)"
    echo "and mirrored on Kaggle and the HF Hub. Unpack it so that $dir/NWPU-RESISC45/<class>/*.jpg exists." ;;
  patternnet)
    echo "PatternNet (Zhou et al. 2018) is published through the authors' Google Drive (see the paper)."
    echo "Unpack it so that $dir/PatternNet/images/<class>/*.jpg exists." ;;
  whu_rs19)
    echo "WHU-RS19 (Dai & Yang 2010) is published by Wuhan University's captain-whu pages and on Kaggle."
    echo "Unpack it so that $dir/WHU-RS19/<Class>/*.jpg exists." ;;
  *) echo "unknown benchmark '$name'" >&2; exit 2 ;;
esac
echo "then: pixtral-lora data validate <the config's data.path>"
