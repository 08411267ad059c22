#!/usr/bin/env bash
# llama.cpp on this machine, for `mrrec bench --parts llm`: builds llama-cpp-python from PyPI once
# (about 15 minutes on 2 cores; kept in $MRREC_HOME/bench/llama-cpp-venv) and times prefill and
# decode on the GGUF files given. Usage: scripts/llama-cpp-bench.sh [--threads N] MODEL.gguf...
set -euo pipefail
HOME_DIR="${MRREC_HOME:-$HOME/.cache/mrrec}"
VENV="${LLAMA_CPP_VENV:-$HOME_DIR/bench/llama-cpp-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  echo "building llama-cpp-python into $VENV (once; about 15 minutes)" >&2
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --no-cache-dir --quiet "llama-cpp-python${LLAMA_CPP_VERSION:+==$LLAMA_CPP_VERSION}" >&2
fi
exec "$VENV/bin/python" "$(dirname "$0")/llama_cpp_bench.py" "$@"
