#!/usr/bin/env bash
# Offline validation of everything under deploy/ (CI runs it; deploy/install-tools.sh installs
# the tools first; this script installs nothing). Exits non-zero on the first failed step.
#
#   1. lint: hadolint on deploy/Dockerfile, shellcheck on the scripts
#   2. copies in sync: the kustomize config files equal config/*, generated files are current;
#      the overlays name the image tag deploy/image.sh builds (the Cargo.toml version)
#   3. render every kustomization (base, the overlays, monitoring)
#   4. schemas: built-in kinds with kubernetes-validate (strict), Prometheus Operator kinds and
#      trust-manager's Bundle (overlays/sidecar-https/trust-bundle.yaml, applied on its own) with
#      deploy/validate.py's own schemas; cross-references (selectors, ports, names)
#   5. promtool: check rules.yaml and the PrometheusRule's extracted spec; unit-test the alerts
#   6. metric names in the rules and the dashboard exist in src/metrics.rs; the dashboard's
#      queries parse as PromQL
#
# KUBE_VERSION (default 1.33.0, the first with native sidecars GA) picks the schemas.
set -euo pipefail

cd "$(dirname "$0")/.."
KUBE_VERSION=${KUBE_VERSION:-1.33.0}
k8s=deploy/kubernetes
mon=$k8s/monitoring
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

step() { printf '\n== %s\n' "$*"; }

step "tools"
if command -v kustomize >/dev/null; then
  kustomize=(kustomize build)
  echo "kustomize: $(kustomize version 2>&1 | head -1)"
else
  kustomize=(kubectl kustomize)
  echo "kustomize: kubectl $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
fi
for tool in promtool hadolint shellcheck python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run deploy/install-tools.sh" >&2; exit 1; }
done
python3 -c 'import yaml, jsonschema, kubernetes_validate' ||
  { echo "missing Python modules: run deploy/install-tools.sh" >&2; exit 1; }

step "lint: hadolint deploy/Dockerfile"
hadolint deploy/Dockerfile
echo "ok"

step "lint: shellcheck"
shellcheck deploy/check.sh deploy/install-tools.sh deploy/image.sh config/check.sh \
  tests/image/run.sh
echo "ok"

step "copies of config/ used by kustomize are identical"
# kustomize refuses files outside a kustomization's directory, so these are copies.
cmp config/flinks-client-credentials.toml $k8s/base/config.toml
cmp config/gateway.yaml $k8s/overlays/gateway/config.yaml
cmp config/flinks-data-recipient-subjects.toml $k8s/overlays/data-recipient/config.toml
cmp config/gateway-redis.yaml $k8s/components/redis-client/config.yaml
echo "ok"

step "overlays name the image deploy/image.sh builds (bearer-proxy:<Cargo.toml version>)"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
for overlay in sidecar gateway; do
  kust=$k8s/overlays/$overlay/kustomization.yaml
  grep -q '^  - name: bearer-proxy$' "$kust" || { echo "$kust: no images entry for bearer-proxy" >&2; exit 1; }
  grep -q "^    newName: [^ ]*/bearer-proxy\$" "$kust" || { echo "$kust: newName must end in /bearer-proxy" >&2; exit 1; }
  grep -q "^    newTag: \"$version\"\$" "$kust" || { echo "$kust: newTag must be \"$version\"" >&2; exit 1; }
done
echo "ok ($version)"

step "generated files are current (prometheusrule.yaml, grafana-dashboard.json)"
python3 $mon/generate.py --check
echo "ok"

step "render kustomizations"
for dir in base overlays/sidecar overlays/gateway overlays/gateway-redis \
  overlays/gateway-managed-redis overlays/data-recipient overlays/sidecar-https monitoring; do
  out="$tmp/$(basename "$dir").yaml"
  "${kustomize[@]}" "$k8s/$dir" >"$out"
  printf '%-32s %s objects\n' "$dir" "$(grep -c '^kind:' "$out")"
done

step "schemas and cross-references (Kubernetes $KUBE_VERSION)"
mkdir "$tmp/rules"
# base is a part of each overlay; validate the overlays and monitoring, which are applied.
python3 deploy/validate.py manifests --kube-version "$KUBE_VERSION" --rules-dir "$tmp/rules" \
  "$tmp/sidecar.yaml" "$tmp/gateway.yaml" "$tmp/gateway-redis.yaml" \
  "$tmp/gateway-managed-redis.yaml" "$tmp/data-recipient.yaml" "$tmp/sidecar-https.yaml" \
  $k8s/overlays/sidecar-https/trust-bundle.yaml "$tmp/monitoring.yaml"

step "promtool check rules"
promtool check rules $mon/rules.yaml "$tmp"/rules/*.rules.yaml

step "promtool test rules (alert unit tests)"
promtool test rules $mon/rules.test.yaml

step "metric names exist in src/metrics.rs"
python3 deploy/validate.py metrics --promql-out "$tmp/dashboard.rules.yaml" \
  src/metrics.rs $mon/rules.yaml $mon/grafana-dashboard.json

step "dashboard queries parse (promtool, as recording rules)"
promtool check rules "$tmp/dashboard.rules.yaml"

printf '\ndeploy/check.sh: all checks passed\n'
