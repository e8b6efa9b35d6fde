#!/usr/bin/env bash
# Re-take docs/images/mlflow-runs.png: the transfer_learning experiment's runs in MLflow's UI, each
# named after its data, with the images it used in the Dataset column.
# Needs a project folder whose mlflow.db holds finished runs (default: this one) and Debian's
# `chromium`.
#   bash docs/images/mlflow_screenshot.sh [project folder]
set -euo pipefail
cd "$(dirname "$0")/../.."
project=$(realpath "${1:-.}")
out="$PWD/docs/images/mlflow-runs.png"
experiment=$(.venv/bin/python - "$project" <<'PY'
import sys, mlflow
mlflow.set_tracking_uri(f"sqlite:///{sys.argv[1]}/mlflow.db")
print(mlflow.get_experiment_by_name("transfer_learning").experiment_id)
PY
)
port=5077
.venv/bin/mlflow ui --backend-store-uri "sqlite:///$project/mlflow.db" --host 127.0.0.1 \
  --port $port >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,900 \
  --force-device-scale-factor=1.5 --virtual-time-budget=25000 \
  --screenshot="$out" "http://127.0.0.1:$port/#/experiments/$experiment?workflowType=machine_learning"
echo "wrote $out"
