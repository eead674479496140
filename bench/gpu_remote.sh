#!/usr/bin/env bash
# The GPU measurements of bench/README.md ("GPU"), on a machine that has CUDA, PyTorch and transformers but no
# network and no locaudit install. Run from the repository root, with the inputs prepared by
# `bench/gpu_remote.sh prepare` on a machine that has them (the embedded GGUF, TruthfulQA, the tokenizer):
#
#   bench/gpu_remote.sh prepare          # here: fill .gpu/ (git-ignored): data, tokenizer, gguf wheel, GGUF in 2 parts
#   bench/gpu_remote.sh checks OUTDIR    # there: CUDA/bf16 tests + random-init SmolLM2/Llama-7B stage timings
#   bench/gpu_remote.sh study OUTDIR     # there: the gpu_slice study on the real SmolLM2 (answers judged later)
#
# The GGUF travels in two parts because one transfer to the machine is capped below its size: `checks` carries
# .gpu/part_a and keeps a copy in /tmp (the next transfer replaces .gpu/), `study` carries .gpu/part_b, joins
# the two and checks the SHA-256, so the two calls must run on the same (still warm) machine. The CE/KL corpus
# travels as .gpu/site/gensim (just the data file locaudit reads from that package). The study's run directory
# comes back as OUTDIR/run.tgz; judge it where the judges are:  tar xzf run.tgz && locaudit judge run run
set -uo pipefail
mode=${1:?usage: bench/gpu_remote.sh prepare|checks OUTDIR|study OUTDIR}
out=${2:-/tmp/gpu-out}
G=.gpu
setup() {
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $G/whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site:$PWD/$G/site:$PWD PYTHONUNBUFFERED=1 LOCAUDIT_CACHE=/tmp/locaudit-cache \
        LOCAUDIT_DATA=$PWD/$G/truthfulqa
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}
case $mode in
prepare)
    py=.venv/bin/python
    gguf=$($py -c "from locaudit.models import embedded_gguf; print(embedded_gguf('smollm2-135m'))")
    data=$($py -c "from locaudit.data.truthfulqa import find_data_dir; print(find_data_dir(download=False))")
    tokdir=$($py -c "from locaudit.models import _dequantised_cache, embedded_gguf; print(_dequantised_cache(embedded_gguf('smollm2-135m')))")
    corpus=$($py -c "from locaudit.evaluation.lm_metrics import _gensim_file; print(_gensim_file('wiki'))")
    rel=$($py -c "from locaudit.evaluation.lm_metrics import _GENSIM_DATA; print(_GENSIM_DATA['wiki'])")
    rm -rf $G && mkdir -p $G/truthfulqa $G/tokenizer $G/whl $G/part_a $G/part_b "$(dirname "$G/site/gensim/$rel")"
    touch $G/site/gensim/__init__.py && cp "$corpus" "$G/site/gensim/$rel"
    cp "$data/TruthfulQA.csv" "$data/mc_task.json" $G/truthfulqa/
    grep -E "TruthfulQA.csv|mc_task.json" "$data/SHA256SUMS" > $G/truthfulqa/SHA256SUMS
    cp "$tokdir"/tokenizer.json "$tokdir"/tokenizer_config.json "$tokdir"/config.json $G/tokenizer/
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform any -d $G/whl "gguf==$($py -c 'import gguf, importlib.metadata as m; print(m.version("gguf"))')"
    sha256sum "$gguf" | cut -d' ' -f1 > $G/gguf.sha256
    head -c 50000000 "$gguf" > $G/part_a/gguf.a
    tail -c +50000001 "$gguf" > $G/part_b/gguf.b
    du -sh $G/* ;;
checks)
    setup
    cp $G/part_a/gguf.a /tmp/gguf.a
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -4
    timeout 420 python3 -m bench.gpu --tokenizer $G/tokenizer --data-dir $G/truthfulqa --out "$out/gpu.json" 2>&1 | tail -4 ;;
study)
    setup
    gguf=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    cat /tmp/gguf.a $G/part_b/gguf.b > $gguf
    echo "$(cat $G/gguf.sha256)  $gguf" | sha256sum -c - || exit 3
    start=$(date +%s)
    timeout "${STUDY_SECONDS:-450}" python3 -m locaudit.cli run --preset bench/presets/gpu_slice.toml --model $gguf \
        --device cuda --dtype bfloat16 --judge none --out /tmp/run 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -15
    echo "study wall seconds: $(( $(date +%s) - start ))"
    tar czf "$out/run.tgz" -C /tmp run && ls -la "$out" ;;
*) echo "unknown mode $mode"; exit 2 ;;
esac
