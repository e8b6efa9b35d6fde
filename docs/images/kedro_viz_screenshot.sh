#!/usr/bin/env bash
# Re-take docs/images/kedro-viz.png: the feature_transfer pipeline, expanded, at a readable zoom.
# Needs a finished `kedro run` in the project (for the run status) and Debian's `chromium`.
#   bash docs/images/kedro_viz_screenshot.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
KEDRO_DISABLE_TELEMETRY=true .venv/bin/kedro viz build
# kedro-viz keeps its settings in localStorage: a page of the same origin sets them first (light
# theme, no onboarding hints, no minimap, sidebar closed), then opens the pipeline expanded.
cat > build/screenshot-setup.html <<'HTML'
<script>
localStorage.setItem("KedroViz", JSON.stringify({theme: "light", showFeatureHints: false,
  visible: {miniMap: false, sidebar: false}, expandAllPipelines: true}));
location.replace("/?pid=feature_transfer&expandAllPipelines=true");
</script>
HTML
python3 -m http.server 8765 --bind 127.0.0.1 --directory build >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
sleep 1
# A tall window fits the pipeline's height; scale factor 2 keeps the node names sharp.
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1100,1300 \
  --force-device-scale-factor=2 --virtual-time-budget=20000 \
  --screenshot="$PWD/docs/images/kedro-viz.png" "http://127.0.0.1:8765/screenshot-setup.html"
