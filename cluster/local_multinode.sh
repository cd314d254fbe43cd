#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine: a head node plus worker nodes whose
# custom resources stand in for the production node types, so placement by resources
# can be tried (and tested) without GPUs.
#   cluster/local_multinode.sh start   # head + "h200x8" worker + "ram" worker
#   serve deploy serve_config.yaml     # or a config whose tiers ask for these resources
#   cluster/local_multinode.sh stop
set -euo pipefail
RAY="${RAY:-$(dirname "$0")/../.venv/bin/ray}"
PORT="${RAY_HEAD_PORT:-6390}"
# Ray 2.60 authenticates nodes with a token: one shared token for the local nodes.
export RAY_AUTH_MODE=token
# every node starts with the app's Ray environment (Ray Serve's throughput-optimized path)
set -a; . "$(dirname "$0")/ray.env"; set +a
case "${1:-start}" in
  start)
    "$RAY" get-auth-token --generate > /dev/null
    "$RAY" start --head --port "$PORT" --num-cpus 4 --disable-usage-stats \
      --resources '{"node_head": 1}'
    # Each extra `ray start` on this machine is one more Ray node (its own raylet).
    "$RAY" start --address "127.0.0.1:$PORT" --num-cpus 4 \
      --resources '{"node_h200x8": 1}'
    "$RAY" start --address "127.0.0.1:$PORT" --num-cpus 4 \
      --resources '{"host_ram_gb": 800}'
    "$RAY" status
    ;;
  stop)
    "$RAY" stop --force
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
