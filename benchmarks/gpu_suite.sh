#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one command, most important first (the figures the
# performance issue asks for: STAM-16 bf16 and fp16, STAM-64, run_eval.py cold and cached, the
# prepared input path, torch.compile; then the diagnostics), each step bounded so that one
# failure or stall costs only its own figures.
#
#   OUT=results_dir bash benchmarks/gpu_suite.sh          # on the GPU machine
#   SMOKE=1 OUT=/tmp/suite bash benchmarks/gpu_suite.sh   # the same steps at tiny sizes (CPU)
#
# An offline GPU machine without PyAV, ml_collections or the prepared-dataset packages gets them
# as wheels from benchmarks/offline_wheels.sh, installed there by benchmarks/install_wheels.sh:
#   bash benchmarks/install_wheels.sh .whl /tmp/site && export PYTHONPATH=/tmp/site
#
# Results: $OUT/results.jsonl (per step a {"step": ...} line, then the step's JSON lines),
# $OUT/stderr.log, $OUT/steps.log (exit status and seconds per step), $OUT/machine.txt.
set -u
OUT=${OUT:-/tmp/stam_gpu_suite}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) PYTHONUNBUFFERED=1
# JAX takes 60% of the GPU's memory up front, leaving the rest to PyTorch in the same process.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
PY=${PYTHON:-python3}

if [ "${SMOKE:-0}" = 1 ]; then
  M16=stam_tiny M64=stam_tiny_mean B_SMALL=2 B_LARGE=4 B_TRAIN=4 MM=256 REP=1 INNER=1 VIDEOS=2
  HALF=float32 T=300 BLOCK="--smoke" E2E="--model stam_tiny --config configs/tiny.py --height 48"
  E2E="$E2E --width 64 --videos 4 --batch 2" PREP="$E2E"
  DECODE="--videos 2 --workers 2 --height 48 --width 64 --resize 36 --crop 32 --frames 4"
else
  M16=stam_16 M64=stam_64 B_SMALL=8 B_LARGE=32 B_TRAIN=16 MM=8192 REP=10 INNER=3 VIDEOS=8
  HALF=bfloat16 T=1 BLOCK="--frames 512 --repeats 10 --matmul-size 8192"
  E2E="--model stam_16 --videos 96 --batch 32"
  PREP="--model stam_16 --videos 256 --unique 64 --batch 32"
  DECODE="--videos 8 --workers $(nproc)"
fi

DEADLINE=${DEADLINE:-500}  # seconds for the whole suite; later steps get what is left

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  case " ${ONLY:-$name} " in *" $name "*) ;; *) return ;; esac  # ONLY="a b": just those steps
  [ "$T" = 300 ] && seconds=300
  local left=$((DEADLINE - SECONDS - 5))
  [ "$left" -lt "$seconds" ] && seconds=$left
  if [ "$seconds" -lt 20 ]; then
    echo "step $name: skipped, $left s left" | tee -a "$OUT/steps.log"
    return
  fi
  local start=$SECONDS
  echo "{\"step\": \"$name\"}" >>"$OUT/results.jsonl"
  echo "=== $name" >>"$OUT/stderr.log"
  timeout "$seconds" "$@" >>"$OUT/results.jsonl" 2>>"$OUT/stderr.log"
  echo "step $name: rc=$? in $((SECONDS - start)) s" | tee -a "$OUT/steps.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1
  $PY -c 'import jax, flax, optax, torch; print(jax.__version__, flax.__version__, optax.__version__, torch.__version__, jax.devices())'
  # What the input steps need beyond the image (carried as wheels): PyAV, and for prepared
  # datasets tensorflow-datasets, grain and array_record.
  $PY -c 'import av, grain, tensorflow_datasets as t, google.protobuf as p
print("av", av.__version__, "tfds", t.__version__, "protobuf", p.__version__)' 2>&1 | tail -1
} | tee "$OUT/machine.txt"

F=benchmarks/forward_bench.py
# Each stam-jax forward twice: as run_eval.py compiles it (cuBLAS for every matmul,
# config.triton_gemm=False) and with XLA's Triton GEMMs (XLA's default), alternating with
# PyTorch eager and SDPA. Then the kernel profile of the same forward: where the time goes.
step fwd16_${HALF} 130 $PY $F --models $M16 --batches $B_LARGE --dtype $HALF \
  --attention auto --triton-gemm off,on --torch-sdpa --repeats $REP --inner $INNER \
  --matmul-size $MM
step kprof_${HALF} 60 $PY benchmarks/kernel_profile.py --model $M16 --batch $B_LARGE --dtype $HALF
step fwd16_float16 90 $PY $F --models $M16 --batches $B_LARGE --dtype float16 \
  --triton-gemm off,on --torch-sdpa --repeats $REP --inner $INNER --matmul-size $MM
step fwd64_${HALF} 90 $PY $F --models $M64 --batches $B_SMALL --dtype $HALF \
  --triton-gemm off,on --torch-sdpa --repeats $REP --inner 1 --matmul-size $MM
# run_eval.py end to end on generated videos (PyAV needed), twice: a cold start, then a cached one.
rm -rf /tmp/stam_suite_eval_cache
step eval_e2e 150 $PY benchmarks/eval_bench.py $E2E --dtype $HALF --repeat 2 \
  --cache-dir /tmp/stam_suite_eval_cache --timeout 60
# The same run_eval.py reading a raw prepared copy of 256 videos (64 encoded, each linked 4
# times; stam_jax.data.prepare, not timed), then decoding the videos themselves; the cache is
# warm from eval_e2e. Does the loop wait for input (input_wait_s) at the GPU's rate?
step eval_prepared 150 $PY benchmarks/eval_bench.py $PREP --dtype $HALF --inputs raw,videos \
  --cache-dir /tmp/stam_suite_eval_cache --timeout 60
step fwd16_torch_compile 200 $PY $F --models $M16 --batches $B_LARGE --dtype $HALF \
  --torch-compile --repeats $REP --inner $INNER --matmul-size $MM
# The diagnostics: each step below explains or follows up a figure above.
# One batch to the device as uint8 (what the pipeline sends) against float32 scaled on the host.
step transfer 30 $PY benchmarks/transfer_bench.py --batch $B_LARGE --repeats 20
# The parts each recent change replaced (GELU via erfc, the patch convolution, sliced q|k|v)
# beside their replacements, same run: one ViT block's parts on a batch of 32 videos' frames.
step block_${HALF} 90 $PY benchmarks/block_profile.py --dtype $HALF --torch-sdpa $BLOCK
step block_${HALF}_triton_gemm 60 $PY benchmarks/block_profile.py --dtype $HALF --torch-sdpa \
  --triton-gemm $BLOCK
# The forward with XLA's Triton GEMMs, kernel by kernel.
step kprof_${HALF}_triton_gemm 60 $PY benchmarks/kernel_profile.py --model $M16 \
  --batch $B_LARGE --dtype $HALF --no-torch --triton-gemm
step train16_remat 120 $PY benchmarks/train_bench.py --model $M16 --batch $B_TRAIN --dtype $HALF \
  --steps 5 --remat
step train16 70 $PY benchmarks/train_bench.py --model $M16 --batch $B_TRAIN --dtype $HALF --steps 10
step train16_triton_gemm 70 $PY benchmarks/train_bench.py --model $M16 --batch $B_TRAIN \
  --dtype $HALF --steps 10 --triton-gemm
step train16_no_donate 70 $PY benchmarks/train_bench.py --model $M16 --batch $B_TRAIN \
  --dtype $HALF --steps 10 --no-donate
step precision 80 $PY benchmarks/precision.py --model $M16 --videos $VIDEOS
step fwd16_${HALF}_small 60 $PY $F --models $M16 --batches $B_SMALL --dtype $HALF \
  --repeats $REP --inner $INNER --matmul-size $MM
for i in 1 2; do  # compile time: empty persistent cache, then a second process hitting it
  step compile_cache 40 $PY $F --models $M16 --batches $B_SMALL --dtype $HALF --no-torch \
    --repeats 1 --matmul-size 256 --cache-dir /tmp/stam_suite_xla_cache
done
# The raw-video input on this host's cores (CPU only): decoder threads per decoding process at
# one process per core, and decoding without the non-reference frames no clip takes.
step decode_threads 60 $PY benchmarks/decode_bench.py $DECODE --repeat 2 --compare-threads
step decode_skipping 40 $PY benchmarks/decode_bench.py $DECODE --repeat 2 --compare-skipping
rm -rf /tmp/stam_suite_xla_cache /tmp/stam_suite_eval_cache
echo done | tee -a "$OUT/steps.log"
cat "$OUT/results.jsonl"
