# Source this on the lent GPU machine, in the repository's root, before `make ... PY=python3`:
#   . gpu/env.sh
# It installs the wheelhouse `make gpu-wheels` built (WHEELS, default .whl/) into SITE (default
# /tmp/site) without any index, puts SITE and the repository on PYTHONPATH ahead of the machine's
# own packages, and checks with pip's resolver, against what is installed, that nothing the
# project needs is missing or of a version it refuses. PYTHON is the interpreter (python3).
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/site}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || return 1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Would install nothing: every requirement is met by the machine and the wheelhouse together.
"$PYTHON" -m pip install -q --dry-run --no-index --find-links "$WHEELS" \
    -r "$WHEELS/requirements.txt" -c "$WHEELS/carried.txt" || echo "[gpu-check] warning: pip's resolver finds the" \
    "environment short of the requirements above; gpu-check's preflight says whether it imports"
