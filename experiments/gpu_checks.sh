#!/usr/bin/env bash
# Every GPU claim of the project, checked in one go on a CUDA machine (we use an H100 through the
# device tool; the figures in experiments/results/ came from this script). Usage:
#   bash experiments/gpu_checks.sh tests|bench|experiments  OUT_DIR
# Needs torch + triton there; hydra comes from wheels in .whl/ when the machine has no hydra.
set -uo pipefail
part=${1:?tests|bench|experiments}
out=${2:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import hydra" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
case $part in
  tests)  # bitwise invariance at real sizes: every kernel, and the whole model
    python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$out/gpu_kernel_tests.log"
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_invariance.py 2>&1 | tee "$out/gpu_model_tests.log" ;;
  bench)  # end-to-end price of invariance
    python3 -m experiments.bench_model --out "$out" 2>&1 | tee "$out/bench_model.log" ;;
  experiments)  # the serving simulation (1000 runs of one prompt) and the ablation, on the GPU
    python3 -m experiments.serve_sim device=cuda model=small dtype=bfloat16 serve.n_probe_runs=1000 \
      serve.load=8 serve.max_slots=64 hydra.run.dir="$out/serve_sim" 2>&1 | grep -v "config/s" | tee "$out/serve_sim.log"
    python3 -m experiments.ablate device=cuda model=small 'dtypes=[bfloat16]' hydra.run.dir="$out/ablate" \
      2>&1 | grep -v "cell/s" | tee "$out/ablate.log"
    python3 -m experiments.ablate device=cuda model=large router.names=[topk,capacity] 'dtypes=[bfloat16]' \
      'combines=[ordered]' experiment.n_probes=2 'experiment.batch_sizes=[1,8,64]' \
      hydra.run.dir="$out/ablate_large" 2>&1 | grep -v "cell/s" | tee "$out/ablate_large.log" ;;
esac
