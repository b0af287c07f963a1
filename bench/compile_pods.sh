#!/bin/bash
# The README's TPU-pod table: `cm3leon compile` for the three paper configs on two or more
# pod shapes each (about 6 minutes per line on a 2-core CPU), and their generation step.
# Needs the `tpu` extra.
# Usage: bench/compile_pods.sh [OUTDIR]   (one OUTDIR/NAME.txt per line; failures go on)
out=${1:-runs/compile_pods}
mkdir -p "$out"
run() {
  name=$1; shift
  echo "== $name: cm3leon compile $*"
  cm3leon compile "$@" > "$out/$name.txt" 2>&1
  echo "exit $?" >> "$out/$name.txt"
  cat "$out/$name.txt"
}
A="model.logits_chunk=1024"
run 350m_v5e16 --config configs/cm3leon_350m.yaml --topology v5e-16 train.grad_accum=64 $A
run 350m_v5p8  --config configs/cm3leon_350m.yaml --topology v5p-8 train.grad_accum=64 $A
run 760m_v5e16 --config configs/cm3leon_760m.yaml --topology v5e-16 train.grad_accum=128 $A
run 760m_v5p8  --config configs/cm3leon_760m.yaml --topology v5p-8 train.grad_accum=64 $A
run 7b_v5p64   --config configs/cm3leon_7b.yaml --topology v5p-64 train.grad_accum=32 $A
run 7b_v5e64   --config configs/cm3leon_7b.yaml --topology v5e-64 train.grad_accum=32 $A
run 7b_v5e32   --config configs/cm3leon_7b.yaml --topology v5e-32 train.grad_accum=64 $A
run 7b_v5e16   --config configs/cm3leon_7b.yaml --topology v5e-16 train.grad_accum=128 $A
run 7b_v5p8    --config configs/cm3leon_7b.yaml --topology v5p-8 train.grad_accum=512 $A
run 7b_v5e64_paper --config configs/cm3leon_7b.yaml --topology v5e-64
# the generation step (`--step generate`): 1024 image tokens after 3072-token prompts, CFG
run gen_350m_v5e16 --config configs/cm3leon_350m.yaml --topology v5e-16 --step generate
run gen_760m_v5e16 --config configs/cm3leon_760m.yaml --topology v5e-16 --step generate --batch 8
run gen_7b_v5p8    --config configs/cm3leon_7b.yaml --topology v5p-8 --step generate --batch 2
