#!/usr/bin/env bash
# Pin one image tag to the digest you pushed, in every cluster file that names it:
#
#   docker buildx build -f cluster/Dockerfile -t ghcr.io/example/ray-app:2.60.0-py311-cpu \
#     --push --metadata-file /tmp/meta.json .
#   cluster/pin-image.sh 2.60.0-py311-cpu "$(jq -r '."containerimage.digest"' /tmp/meta.json)"
#
# (or the digest from `docker buildx imagetools inspect ghcr.io/example/ray-app:<tag>`). Nodes and
# pods then run exactly that build; a re-pushed tag changes nothing until you pin again.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 <tag, e.g. 2.60.0-py311-cpu> <digest, sha256:<64 hex>>" >&2
  exit 2
fi
tag=$1
digest=$2
if ! [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]]; then
  echo "not a digest: $digest (expected sha256:<64 lowercase hex>)" >&2
  exit 2
fi
cluster=$(cd "$(dirname "$0")" && pwd)
files=$(grep -rlE --include='*.yaml' "ray-app:${tag}@sha256:[0-9a-f]{64}" "$cluster" || true)
if [ -z "$files" ]; then
  echo "no cluster file names ray-app:${tag}@sha256:..." >&2
  exit 1
fi
for file in $files; do
  sed -i -E "s#(ray-app:${tag})@sha256:[0-9a-f]{64}#\\1@${digest}#g" "$file"
  echo "pinned ${tag} in ${file#"$cluster"/}"
done
