#!/usr/bin/env bash
# The wheels scripts/bench_gpu.py needs beyond what a bare CUDA machine usually has (torch,
# transformers, peft, accelerate, pyyaml, scikit-learn, matplotlib, pandas, pyarrow), for a machine
# without network:
#
#     bash scripts/gpu_kit.sh                  # -> .gpu-wheels/ (git-ignored), ~27 MB
#     # copy the repository with .gpu-wheels/ to the GPU machine, then there:
#     python3 -m pip install --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl
#     PYTHONPATH=/tmp/site:src python3 scripts/bench_gpu.py
#
# Installed beside, not into, the GPU machine's environment, so its own torch and transformers are
# the ones under test. The pins are the versions the test suite runs with. The bitsandbytes wheel is
# rebuilt with its CPU library and the CUDA builds named in BNB_CUDA only (it holds one per CUDA
# release, 43 MB in all); its RECORD lists what is left.
#
#     PYTHON_VERSION   the GPU machine's Python, major.minor (default 3.12)
#     BNB_CUDA         bitsandbytes libraries kept, as in libbitsandbytes_<NAME>.so (default cuda130 cuda132)
#     OUT              the folder written (default .gpu-wheels); replaced only if it holds a kit
set -euo pipefail

PYTHON_VERSION=${PYTHON_VERSION:-3.12}
BNB_CUDA=${BNB_CUDA:-cuda130 cuda132}
OUT=${OUT:-.gpu-wheels}
PIP=${PIP:-python3 -m pip}

PACKAGES=(
  trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  mistral_common==1.13.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 pydantic-extra-types==2.11.1 pycountry==26.2.16
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  # Mistral's reference model for the logits stage (its xformers requirement is optional there)
  mistral_inference==1.6.0 simple-parsing==0.1.9 docstring-parser==0.17.0
  # Liger's Triton kernels, for the check's speed-option stage (training.use_liger_kernel)
  liger-kernel==0.8.5
)

if [ -e "$OUT" ] && [ ! -e "$OUT/.pixtral-lora-gpu-kit" ]; then
  echo "error: $OUT exists and is not a kit this script wrote; choose another OUT or remove it" >&2
  exit 2
fi
partial="$OUT.partial-$$"
rm -rf "$partial"
trap 'rm -rf "$partial"' EXIT
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$tag")
done
$PIP download --quiet --no-deps --only-binary=:all: --dest "$partial" \
  --python-version "$PYTHON_VERSION" --implementation cp "${platforms[@]}" "${PACKAGES[@]}"

python3 - "$partial" $BNB_CUDA <<'PY'
import sys, zipfile
from pathlib import Path

folder, keep = Path(sys.argv[1]), {"cpu", *sys.argv[2:]}
[wheel] = folder.glob("bitsandbytes-*.whl")
slim = wheel.with_suffix(".slim")
def wanted(name):
    stem = Path(name).name
    if not (stem.startswith("libbitsandbytes_") and stem.endswith(".so")):
        return True
    return stem.removeprefix("libbitsandbytes_").removesuffix(".so") in keep

with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    items = [item for item in source.infolist() if wanted(item.filename)]
    for item in items:
        data = source.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if wanted(line.split(",")[0])).encode()
        target.writestr(item, data)
    dropped = len(source.infolist()) - len(items)
kept = [item.filename for item in items if "libbitsandbytes_cuda" in item.filename]
if not kept:
    sys.exit(f"error: bitsandbytes ships none of: {' '.join(sorted(keep - {'cpu'}))}")
slim.replace(wheel)
print(f"bitsandbytes: {dropped} libraries dropped, kept cpu and {' '.join(sorted(keep - {'cpu'}))}")
PY
touch "$partial/.pixtral-lora-gpu-kit"
rm -rf "$OUT"
mv "$partial" "$OUT"
trap - EXIT
echo "$OUT: $(du -sh "$OUT" | cut -f1) of wheels for Python $PYTHON_VERSION"
