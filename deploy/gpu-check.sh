#!/usr/bin/env bash
# Runs a Proctor agent against the real NVIDIA driver on this host and prints
# what it sees: its GPU capability, every device (memory, utilisation) and
# the GPU processes it found, next to what nvidia-smi says. Nothing is
# started on the GPU; the agent listens on loopback only and is stopped at
# the end.
#
#   deploy/gpu-check.sh [path/to/proctor] [path/to/libnvidia-ml.so.1]
set -euo pipefail
proctor="${1:-$(command -v proctor || echo target/release/proctor)}"
library="${2:-}"
[ -x "$proctor" ] || { echo "no proctor binary at $proctor (build with: cargo build --release)"; exit 2; }

dir="$(mktemp -d)"
trap 'kill "$agent" 2>/dev/null || true; wait "$agent" 2>/dev/null || true; rm -rf "$dir"' EXIT
{
  echo 'listen = "127.0.0.1:0"'
  echo "data_dir = \"$dir/data\""
  [ -n "$library" ] && echo "nvml_library = \"$library\""
} > "$dir/agent.toml"

"$proctor" agent --config "$dir/agent.toml" > "$dir/out" 2> "$dir/err" &
agent=$!
for _ in $(seq 1 50); do
  addr="$(sed -n 's/^proctor agent listening on \([^ ]*\).*/\1/p' "$dir/out")"
  [ -n "$addr" ] && break
  sleep 0.2
done
[ -n "${addr:-}" ] || { echo "the agent did not start:"; cat "$dir/err"; exit 2; }
sleep 2   # two telemetry samples (1 s apart)

echo "== the agent's log about NVML"
grep -i "gpu sampling" "$dir/err" || echo "(no NVML line)"
echo
echo "== proctor agents (text)"
"$proctor" agents --agent "$addr"
echo
echo "== proctor agents --output json (GPU part)"
"$proctor" agents --agent "$addr" --output json | python3 -c 'import json,sys; h=json.load(sys.stdin)[0]; print(json.dumps(h["agent"]["gpus"], indent=2))'
echo
if command -v nvidia-smi >/dev/null; then
  echo "== nvidia-smi, for comparison"
  nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu,temperature.gpu,power.draw --format=csv
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv || true
fi
