#!/usr/bin/env bash
# A real model load on a real GPU, end to end: a Proctor agent supervises a
# small stand-in model service (Python, stdlib only) that allocates GPU memory
# through the driver's libcuda in eight steps while its /health says
# "loading", then "loaded". `proctor run` waits for it and runs one case; the
# script then shows what the agent attributed to the service next to what
# nvidia-smi says, the device CUDA_VISIBLE_DEVICES named, and a load that no
# GPU here could hold refused with every device's numbers.
#
#   deploy/gpu-load-check.sh [path/to/proctor] [GPU MiB to allocate, default 8192]
set -euo pipefail
proctor="$(realpath "${1:-$(command -v proctor || echo target/release/proctor)}")"
mib="${2:-8192}"
[ -x "$proctor" ] || { echo "no proctor binary at $proctor (build with: cargo build --release)"; exit 2; }
python="$(command -v python3)" || { echo "python3 is needed for the stand-in service"; exit 2; }

dir="$(mktemp -d)"
trap 'kill "$agent" 2>/dev/null || true; wait "$agent" 2>/dev/null || true; rm -rf "$dir"' EXIT

cat > "$dir/service.py" <<'EOF'
import ctypes, json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, total_mib, steps = int(sys.argv[1]), int(sys.argv[2]), 8
state = {"status": "loading", "progress": 0.0, "error": None}

def check(code, what):
    if code != 0:
        raise RuntimeError(f"{what} failed with CUDA error {code}")

def load():
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        check(cuda.cuInit(0), "cuInit")
        device, context = ctypes.c_int(), ctypes.c_void_p()
        check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
        check(cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device), "cuCtxCreate")
        held = []
        for step in range(steps):
            pointer = ctypes.c_uint64()
            size = ctypes.c_size_t((total_mib // steps) << 20)
            check(cuda.cuMemAlloc_v2(ctypes.byref(pointer), size), "cuMemAlloc")
            held.append(pointer)
            state["progress"] = (step + 1) / steps
            print(f"Loading checkpoint shards: {step + 1}/{steps}", flush=True)
            time.sleep(0.5)
        state["status"] = "loaded"
        print("model loaded", flush=True)
        while True:
            time.sleep(3600)
    except Exception as error:
        state["status"], state["error"] = "failed", str(error)
        print(f"load failed: {error}", flush=True)

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"models": {"gpumodel": dict(state)}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

threading.Thread(target=load, daemon=True).start()
ThreadingHTTPServer(("127.0.0.1", port), Health).serve_forever()
EOF

cat > "$dir/agent.toml" <<EOF
listen = "127.0.0.1:0"
data_dir = "$dir/data"

[[service]]
name = "gpu-svc"
command = ["$python", "$dir/service.py", "{port}", "$mib"]

[service.readiness]
protocol = "health-json"
path = "/health"

[[service.model]]
name = "gpumodel"
timeout = "3m"
gpu_mb = $mib

[[service]]
name = "too-big"
command = ["$python", "$dir/service.py", "{port}", "1"]

[service.readiness]
protocol = "health-json"
path = "/health"

[[service.model]]
name = "gpumodel"
gpu_mb = 4000000
EOF

cat > "$dir/suite.yaml" <<'EOF'
name: gpu-load
service: gpu-svc
models: [gpumodel]
gpu_headroom_mb: 1024
cases:
  - name: the service says its model is loaded
    request: {method: GET, path: /health}
    expect:
      status: 200
      json: [{pointer: /models/gpumodel/status, equals: loaded}]
EOF
sed -e 's/^name: gpu-load/name: gpu-too-big/' -e 's/^service: gpu-svc/service: too-big/' \
  -e 's/^gpu_headroom_mb: 1024/max_wait: 5s/' "$dir/suite.yaml" > "$dir/too-big.yaml"

"$proctor" agent --config "$dir/agent.toml" > "$dir/agent.out" 2> "$dir/agent.err" &
agent=$!
for _ in $(seq 1 50); do
  addr="$(sed -n 's/^proctor agent listening on \([^ ]*\).*/\1/p' "$dir/agent.out")"
  [ -n "$addr" ] && break
  sleep 0.2
done
[ -n "${addr:-}" ] || { echo "the agent did not start:"; cat "$dir/agent.err"; exit 2; }

echo "== proctor run (a $mib MiB load through libcuda)"
"$proctor" run --agent "$addr" --out "$dir/out" --progress lines --progress-interval 1s "$dir/suite.yaml" || echo "(exit $?)"
echo
echo "== the load's properties in junit.xml"
grep -o 'proctor\.model\.gpumodel\.[a-z_.A-Z]*" value="[^"]*"' "$dir/out/junit.xml" || true
echo
sleep 1.2   # one more telemetry sample after READY (the run ends at READY + its case)
echo "== proctor agents, the model READY"
"$proctor" agents --agent "$addr"
svc_pid="$("$proctor" agents --agent "$addr" --output json | "$python" -c '
import json, sys
host = json.load(sys.stdin)[0]
print(next(s["pid"] for s in host["agent"]["services"] if s["name"] == "gpu-svc"))')"
echo
echo "== the service (pid $svc_pid): CUDA_VISIBLE_DEVICES given by the agent"
tr '\0' '\n' < "/proc/$svc_pid/environ" | grep CUDA_VISIBLE_DEVICES || echo "(not set)"
if command -v nvidia-smi >/dev/null; then
  echo
  echo "== nvidia-smi, for comparison"
  nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv || true
fi
echo
echo "== a load no GPU here can hold (4,000,000 MiB)"
"$proctor" run --agent "$addr" --out "$dir/out2" --progress lines "$dir/too-big.yaml" || echo "(exit $?)"
echo
echo "== the agent's log about NVML and GPUs"
grep -iE "gpu|nvml" "$dir/agent.err" | head -20 || echo "(none)"
