#!/usr/bin/env bash
# Runs every kvferry test. Installs what a fresh Debian machine lacks first,
# so this one command works on a new machine and in CI alike.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v losetup >/dev/null 2>&1 || need_apt+=(mount)
command -v mkfs.ext2 >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "==> layers, function length, docs"
python3 scripts/layers.py
python3 scripts/long_fns.py
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --quiet
# A venv with what the tests run besides Rust: maturin, pytest and numpy for
# the Python package, moto's S3 server and boto3 for the OBJ backend's tests
# (scripts/s3_test_server.py, which the Rust tests start through
# KVFERRY_TEST_PYTHON). torch is not installed: its tests skip without it.
echo "==> python venv (.venv-test): maturin, pytest, numpy, moto[server], boto3"
VENV="$PWD/.venv-test"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check maturin pytest numpy "moto[server]" boto3
export KVFERRY_TEST_PYTHON="$VENV/bin/python"

echo "==> cargo test"
cargo test --workspace --all-targets --all-features
cargo test --workspace --doc --all-features

# The Python package (crates/kvferry-py): the extension built into the venv
# (a debug build, quick on 2 cores; `pip install ./crates/kvferry-py` builds
# the same package in release mode), and its pytest suite.
echo "==> python: build kvferry into .venv-test and run pytest"
(cd crates/kvferry-py && VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" maturin develop -q)
"$VENV/bin/python" -m pytest -q crates/kvferry-py/tests
