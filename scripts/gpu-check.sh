#!/usr/bin/env bash
# Runs every GPU check kvferry has, in one go, and writes one results file.
#   scripts/gpu-check.sh [RESULTS_FILE]   (default: ${OUT:-.}/gpu-check.txt)
# On a machine without a GPU the GPU tests print why they skip; the file says so.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}/gpu-check.txt}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
{
  echo "# kvferry gpu-check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -5
  echo "## kvferry info"
  cargo run -q -p kvferry-cli --release -- info 2>&1 | grep -A1 -E "GPU"
  echo "## GPU tests (tests/gpu.rs) and the staging pipeline's tests"
  cargo test -q --release -p kvferry --test gpu -- --nocapture 2>&1 | tail -20
  cargo test -q --release -p kvferry --lib -- cuda 2>&1 | tail -5
  echo "## reference: cudaMemcpy H2D/D2H pinned and D2D via PyTorch (64 MiB)"
  python3 - <<'PY' 2>&1
try:
    import torch, time
    n = 64 << 20
    h = torch.empty(n, dtype=torch.uint8).pin_memory(); d = torch.empty(n, dtype=torch.uint8, device="cuda"); d2 = torch.empty_like(d)
    for name, f in [("H2D", lambda: d.copy_(h, non_blocking=True)), ("D2H", lambda: h.copy_(d, non_blocking=True)), ("D2D", lambda: d2.copy_(d))]:
        f(); torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(20): f()
        torch.cuda.synchronize(); print(f"{name} {20 * n / (time.perf_counter() - t) / 1e9:.2f} GB/s")
except Exception as e:
    print("no PyTorch CUDA reference:", e)
PY
  echo "## not yet measurable: kvferry VRAM transfers (LOCAL/SHM/TCP/GDS paths are not implemented; docs/GPU.md)"
} > "$out" 2>&1
echo "results in $out"
