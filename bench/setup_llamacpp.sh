#!/usr/bin/env bash
# The llama-cpp-python column of bench/generate.py: its own virtual environment, so the
# project never depends on llama.cpp. `pip install llama-cpp-python` compiles llama.cpp from
# source (CPU build, 10-30 min on 2 cores); bench/generate.py uses it when present and says
# so when it is absent.
#
#   bench/setup_llamacpp.sh            # creates bench/.venv-llamacpp
#   JOBS=4 bench/setup_llamacpp.sh     # more compiler jobs on a bigger machine
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-llamacpp"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "llama-cpp-python already installed in $venv"
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-2}" "$venv/bin/pip" install --no-cache-dir llama-cpp-python
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'in $venv')"
