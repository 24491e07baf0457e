#!/usr/bin/env bash
# Every GPU-host benchmark in one call (the lent machine is billed by the minute): machine facts,
# load, convert, verify; tables and JSON under $OUT. Run from the repository root:
#     OUT=/some/dir bash benchmarks/device_run.sh [limits] [sweep] [load] [convert] [phases] [verify] [verify1] [hub]
# `hub` needs the huggingface_hub of constraints.txt (2.4.0; the H200 image has 1.33): carry its
# wheels and their new dependencies (httpx2, httpcore2, truststore, hf-xet) and install them with
# `pip install --no-index --no-deps --target /tmp/site` + PYTHONPATH=/tmp/site first.
# The 8 files a call brings back: copy the .md tables out and tar the rest.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/moepack-bench-out}
mkdir -p "$OUT"
what=${*:-limits sweep load convert phases verify verify1}
root=$(pwd)
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || export PYTHONPATH="$root/src"
W=${WORK:-/tmp/moepack-bench}
mkdir -p "$W"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  nproc
  grep -m1 "model name" /proc/cpuinfo
  free -g | head -2
  df -h "$W" | tail -1
  python3 -c "import torch, numpy, safetensors; print('torch', torch.__version__, 'numpy', numpy.__version__, 'safetensors', safetensors.__version__)"
  lscpu | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node\(s\)|L2|L3|Hypervisor|Flags)" \
    | sed -E 's/^(Flags:).*( sha_ni).*/\1 ...\2 .../'
  uname -r
  grep -H . /proc/sys/vm/dirty_ratio /proc/sys/vm/dirty_background_ratio \
    /proc/sys/vm/dirty_expire_centisecs 2>/dev/null
  findmnt -no SOURCE,FSTYPE,OPTIONS --target "$W"
} 2>&1 | tee "$OUT/machine.txt"
cd "$root/benchmarks"
for w in $what; do
  t0=$(date +%s)
  case $w in
    load)
      python3 load.py --threads 8 16 --workdir "$W" --out "$OUT/load.json" 2>&1 | tee "$OUT/load.md" ;;
    convert)
      python3 convert.py --workdir "$W" --layers "${LAYERS:-4}" --out "$OUT/convert.json" \
        --logdir "$W/logs" 2>&1 | tee "$OUT/convert.md"
      tar -czf "$OUT/convert-logs.tgz" -C "$W" logs
      rm -rf "$W/artifact" ;;
    limits)
      python3 machine_limits.py --workdir "$W" --out "$OUT/limits.json" 2>&1 | tee "$OUT/limits.md"
      rm -rf "$W/limits" ;;
    sweep)
      python3 load_sweep.py --workdir "$W" --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.md" ;;
    phases)
      python3 convert_phases.py "$W/super-1layer-fast" "$W/phases" \
        --out "$OUT/phases.json" 2>&1 | tee "$OUT/phases.md" ;;
    verify)
      python3 verify.py --gb "${VERIFY_GB:-6}" --jobs "$(nproc)" --repeat 1 --dir "$W/verify" 2>&1 \
        | tee "$OUT/verify.md"
      rm -rf "$W/verify" ;;
    verify1)
      python3 verify.py --gb "${VERIFY_GB:-6}" --experts 1664 --jobs "$(nproc)" --repeat 1 \
        --dir "$W/verify1" 2>&1 | tee "$OUT/verify1.md"
      rm -rf "$W/verify1" ;;
    hub)
      python3 hub_overlap.py --workdir "$W" --out "$OUT/hub.json" 2>&1 | tee "$OUT/hub.md" ;;
  esac
  echo "[$w took $(( $(date +%s) - t0 )) s]" | tee -a "$OUT/machine.txt"
done
