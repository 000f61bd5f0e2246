#!/usr/bin/env bash
# Download and unpack the AID scene dataset (10,000 aerial JPEGs, 30 classes) with the Kaggle CLI,
# as Mistral's study did. Needs Kaggle credentials (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY).
#   bash scripts/download_aid.sh [DEST]        (default DEST: data/AID)
set -euo pipefail
dest="${1:-data/AID}"
command -v kaggle >/dev/null || { echo "kaggle CLI not found: pip install kaggle" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
kaggle datasets download -d jiayuanchengala/aid-scene-classification-datasets -p "$tmp" --unzip
# The archive unpacks to AID/<ClassName>/<classname>_<n>.jpg; find that folder wherever it lands.
src="$(dirname "$(find "$tmp" -type d -name Forest | head -n 1)")"
[ -d "$src" ] || { echo "unexpected archive layout under $tmp" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial" && mv "$src" "$dest.partial" && mv "$dest.partial" "$dest"
echo "AID unpacked to $dest ($(find "$dest" -name '*.jpg' | wc -l) images)"
