#!/usr/bin/env bash
# kvferry's OBJ backend beside boto3, against one S3 server on this machine
# (moto's, from scripts/s3_test_server.py), alternating round by round:
# 64 x 4 MiB objects WRITE and READ, and 64 x 4 KiB objects WRITE (request
# overhead), both clients with 16 requests in flight.
#
# Usage: scripts/obj_vs_boto3.sh [ROUNDS]   (needs .venv-test with moto and
# boto3, as ./scripts/test.sh makes it, and a release build of the CLI:
# cargo build --release -p kvferry-cli)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PY=${KVFERRY_TEST_PYTHON:-.venv-test/bin/python}
KV=${KVFERRY_BIN:-target/release/kvferry}
info=$(mktemp)
"$PY" scripts/s3_test_server.py < <(sleep 100000) > "$info" 2>/dev/null &
SRV=$!
trap 'kill $SRV 2>/dev/null || true; rm -f "$info"' EXIT
for _ in $(seq 600); do [ -s "$info" ] && break; sleep 0.1; done
line=$(head -1 "$info")
field() { "$PY" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$line" "$1"; }
EP=$(field endpoint) B=$(field bucket) AK=$(field access_key) SK=$(field secret_key)
creds=(--bucket "$B" --endpoint "$EP" --access-key "$AK" --secret-key "$SK")
for r in $(seq "$ROUNDS"); do
  for shape in "write 4M 64 5" "read 4M 64 5" "write 4K 64 20"; do
    set -- $shape
    echo "round $r: $1 $2 x $3"
    "$KV" bench storage --backend obj "${creds[@]}" --op "$1" --block-size "$2" --batch-size "$3" \
      --iters "$4" --warmup 1 --param max_in_flight=16 | tail -1
    "$PY" scripts/obj_bench_boto3.py --endpoint "$EP" --bucket "$B" --access-key "$AK" --secret-key "$SK" \
      --op "$1" --block-size "$2" --batch-size "$3" --iters "$4" --concurrency 16
  done
done
