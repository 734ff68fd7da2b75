#!/usr/bin/env bash
# Everything a session with a GPU should check and measure, in one go (the GPU is lent by the
# minute): the CUDA tests, the overhead table at batch 100, a batch-size sweep 128..4096 in
# float32 and bf16, evaluation throughput at k=5000 on the whole test set, eager vs --jit vs
# torch.compile, and (asked for by name) the whole test suite with the GPU visible.
#
#   bash benchmarks/cuda_session.sh OUT_DIR [STEP ...]
#
# Steps: tests overhead sweep bf16 eval compile suite; by default all but `suite`, about 6 minutes
# on an H200 (2026-11-28). `suite` (the whole test suite with device "auto" meaning CUDA) took
# over 200 s for 45% of the tests there: give it a call of its own, with `-x` in mind.
#
# Each step has its own time limit; logs and result tables land in OUT_DIR, and an archive of it
# ($ARCHIVE, default OUT_DIR.tgz) is refreshed after every step, so a run cut short still
# returns what it measured.
set -u
out=${1:-runs/cuda-session}
shift || true
steps=${*:-tests overhead sweep bf16 eval compile}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYRO_VAE_OFFLINE=${PYRO_VAE_OFFLINE:-1}
archive=${ARCHIVE:-$out.tgz}
mkdir -p "$out"

step() {  # step NAME SECONDS COMMAND...: run, log to OUT/NAME.log, print its tail
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start)) s (limit $limit)"
    tail -n 30 "$out/$name.log"
    tar czf "$archive" --exclude=checkpoint.pt -C "$out" .
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, 'cuda', torch.cuda.is_available())"

for s in $steps; do
    case $s in
    tests) step cuda-tests 150 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py --tb=long ;;
    overhead) step overhead 180 $py benchmarks/overhead.py --device cuda --train-size 10000 --epochs 2 \
        --estimators elbo meanfield iwae:K=50 dreg:K=50 --out "$out" ;;
    sweep) step sweep 200 $py benchmarks/overhead.py --device cuda --presets iwae1 --epochs 2 \
        --estimators elbo --batch-size 128 256 512 1024 2048 4096 --tag sweep-cuda --out "$out" ;;
    bf16) step bf16 200 $py benchmarks/overhead.py --device cuda --presets iwae1 --epochs 2 \
        --estimators elbo iwae:K=50 --batch-size 128 1024 4096 --train-size 20000 --amp bf16 --tag sweep-cuda-bf16 --out "$out"
        step fp32-k50 150 $py benchmarks/overhead.py --device cuda --presets iwae1 --epochs 2 \
        --estimators iwae:K=50 --batch-size 128 1024 4096 --train-size 20000 --tag sweep-cuda-k50 --out "$out" ;;
    eval) step eval 150 bash -c "$py -m pyro_vae train --preset iwae1 --epochs 1 --jit --quiet --device cuda \
        --out '$out/run' && $py -m pyro_vae eval '$out/run' --k 5000 --max-memory 16GB --quiet --device cuda \
        && cp '$out/run/eval.json' '$out/eval-k5000.json'" ;;
    compile) step compile 200 $py benchmarks/jit_vs_compile.py --device cuda ;;
    suite) step suite 500 $py -m pytest -v -p no:cacheprovider --ignore=tests/test_cuda.py --tb=short ;;
    *) echo "unknown step $s" ;;
    esac
done
