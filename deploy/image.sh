#!/usr/bin/env bash
# Builds the bearer-proxy image with one command, and its SBOM next to it.
#
#   deploy/image.sh [--binary PATH] [--stage] [--image NAME] [--out DIR] [--no-sbom]
#
# Default: builds the static release binary on this machine (RUSTFLAGS='-C
# target-feature=+crt-static', target x86_64-unknown-linux-gnu), then the `image-prebuilt`
# target of deploy/Dockerfile from a small context holding only that binary. Needs no base
# image, so it works where registries cannot be reached.
#   --binary PATH  use this already-built static binary instead of building one (CI builds the
#                  release binary once and shares it with the soak test and this script)
#   --stage        build the binary inside the Dockerfile's Rust stage instead (the `image`
#                  target; pulls the Rust image: for normal pipelines)
#   --image NAME   image name (default bearer-proxy); the tag is always the Cargo.toml version,
#                  which deploy/kubernetes's overlays name
#   --out DIR      where the SBOM and the image's description go (default target/image)
#   --no-sbom      skip the SBOM (it needs cargo-sbom: `cargo install --locked cargo-sbom`)
#
# Environment:
#   FEATURES  cargo feature flags for the binary, e.g. FEATURES=--no-default-features; empty (the
#             default) means the default features. Passed to cargo here, or as the FEATURES
#             build argument with --stage. The image's `--version` line is printed; an image
#             that lists dev-tools under FEATURES=--no-default-features is refused.
#   ENGINE    docker or podman; default docker when a Docker daemon answers, else podman.
#
# Writes to DIR: <name>-<version>.cdx.json (CycloneDX 1.6 SBOM of the crates in Cargo.lock
# that are normal dependencies) and <name>-<version>.txt (image reference, id, size, the
# binary's version line).
set -euo pipefail
cd "$(dirname "$0")/.."

binary=""; stage=false; name=bearer-proxy; out=target/image; sbom=true
while (($#)); do
  case $1 in
    --binary) binary=$(realpath "$2"); shift 2 ;;
    --stage) stage=true; shift ;;
    --image) name=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-sbom) sbom=false; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "image.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
features=${FEATURES:-}
target=x86_64-unknown-linux-gnu

if [[ -n ${ENGINE:-} ]]; then
  engine=$ENGINE
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v podman >/dev/null; then
  engine=podman
else
  echo "image.sh: no container engine: need a Docker daemon or podman" >&2; exit 1
fi

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
# The commit only from a checkout whose top is this directory (as build.rs decides), else none.
commit=""
if top=$(git rev-parse --show-toplevel 2>/dev/null) && [[ $(realpath "$top") == "$(pwd -P)" ]]; then
  commit=$(git rev-parse HEAD)
fi
ref="$name:$version"
mkdir -p "$out"
echo "image.sh: $ref with $engine (version $version, commit ${commit:-unknown}, feature flags '${features}')"

build_args=(--build-arg "VERSION=$version" --build-arg "GIT_COMMIT=${commit:-unknown}" --build-arg "FEATURES=$features")
if $stage; then
  "$engine" build -f deploy/Dockerfile --target image "${build_args[@]}" -t "$ref" .
else
  if [[ -z $binary ]]; then
    # shellcheck disable=SC2086 # FEATURES holds several flags on purpose
    RUSTFLAGS='-C target-feature=+crt-static' BEARER_PROXY_GIT_COMMIT="$commit" \
      cargo build --release --locked --target "$target" $features
    binary=$PWD/target/$target/release/bearer-proxy
  fi
  # A dynamically linked binary would start nowhere in an empty image: refuse it here.
  if readelf -d "$binary" 2>/dev/null | grep -q NEEDED; then
    echo "image.sh: $binary is not static (it has NEEDED libraries); build it with" \
      "RUSTFLAGS='-C target-feature=+crt-static' --target $target" >&2
    exit 1
  fi
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' EXIT
  # rootfs/ is copied root-owned, state/ owned by 65532 (see the Dockerfile).
  install -d -m 0755 "$ctx/rootfs/var/lib"
  install -d -m 0700 "$ctx/state/bearer-proxy"
  install -m 0755 "$binary" "$ctx/rootfs/bearer-proxy"
  # Debug line tables and symbols are half the binary; the image ships without them (the
  # unstripped binary stays in target/ for symbolising a backtrace).
  strip "$ctx/rootfs/bearer-proxy"
  "$engine" build -f deploy/Dockerfile --target image-prebuilt "${build_args[@]}" -t "$ref" "$ctx"
fi

# What the image's binary says it is (no shell in the image: run the binary as the entrypoint).
version_line=$("$engine" run --rm --network none "$ref" --version)
echo "image.sh: $version_line"
if [[ -n $commit && $version_line != *"commit $commit"* ]]; then
  echo "image.sh: the image's binary was not built from $commit (stale --binary?)" >&2; exit 1
fi
if [[ $features == *--no-default-features* && $version_line == *"features: "*dev-tools* ]]; then
  echo "image.sh: FEATURES=$features but the binary has dev-tools" >&2; exit 1
fi

id=$("$engine" image inspect --format '{{.Id}}' "$ref")
size=$("$engine" image inspect --format '{{.Size}}' "$ref")
base="$out/$name-$version"
{
  echo "image: $ref"
  echo "id: $id"
  echo "size_bytes: $size"
  echo "binary: $version_line"
} > "$base.txt"
echo "image.sh: $ref id ${id:0:12} size $((size / 1024)) KiB"

if $sbom; then
  command -v cargo-sbom >/dev/null ||
    { echo "image.sh: cargo-sbom missing: cargo install --locked cargo-sbom (or --no-sbom)" >&2; exit 1; }
  # cargo-sbom lists the crates of Cargo.lock that are normal dependencies (no dev-dependencies),
  # for every platform. It names the document after the directory and the user running it;
  # name it after the image instead.
  cargo sbom --output-format cyclone_dx_json_1_6 |
    python3 -c 'import json, sys
d = json.load(sys.stdin)
c = d["metadata"]["component"]
c.update(name=sys.argv[1], version=sys.argv[2], type="container")
c["properties"] = [{"name": "image.id", "value": sys.argv[3]}, {"name": "vcs.revision", "value": sys.argv[4]}]
d["metadata"].pop("authors", None)
json.dump(d, sys.stdout, indent=1)' "$name" "$version" "$id" "${commit:-unknown}" > "$base.cdx.json"
  echo "image.sh: SBOM $base.cdx.json"
fi
