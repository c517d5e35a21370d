#!/usr/bin/env bash
# keel's check for a machine with a GPU: the gpu tests, then the default test suite, on that machine.
#
#   bash benchmarks/gpu_check.sh
#
# 1. Finds the packages the tests need; where some are missing (a machine without a package registry), installs
#    the wheels carried in the git-ignored .whl/ folder into /tmp/keel-site (pip --no-index --no-deps) and puts it
#    on PYTHONPATH with src/ (keel itself is used from this checkout: nothing is installed into the system).
# 2. python -m pytest -m gpu: the tests that need CUDA (tests/gpu/), 4 workers.
# 3. The default suite (not slow, not faults) without the gpu tests, which step 2 ran: 12 workers.
# Each step has a time limit (the whole check fits in 8 minutes); the last lines are pytest's summary lines.
# Settings: PYTHON (python3), KEEL_GPU_WORKERS (4), KEEL_SUITE_WORKERS (12), KEEL_GPU_LIMIT_S (180),
# KEEL_SUITE_LIMIT_S (270), KEEL_SITE (/tmp/keel-site). docs/gpu.md says how to fill .whl/.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
SITE=${KEEL_SITE:-/tmp/keel-site}
LOGS=$(mktemp -d /tmp/keel-gpu-check.XXXXXX)
NEEDED="torch numpy yaml pydantic tqdm matplotlib safetensors sklearn pytest xdist hypothesis pytorch_optimizer"

missing() {  # the modules named in $@ that this Python cannot import (with the reason when it is not absence)
    "$PYTHON" - "$@" <<'EOF'
import importlib, sys
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError as error:
        failed.append(name if isinstance(error, ModuleNotFoundError) and error.name == name else f"{name} ({error})")
print(" ".join(failed))
EOF
}

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
absent=$(missing $NEEDED)
wheels=(.whl/*.whl)
if [ -e "${wheels[0]}" ]; then
    echo "gpu_check: installing ${#wheels[@]} wheels from .whl/ into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "${wheels[@]}" || exit 2
    export PYTHONPATH="$SITE:$PYTHONPATH"
    absent=$(missing $NEEDED)
fi
if [ -n "$absent" ]; then
    echo "gpu_check: this Python cannot import: $absent" >&2
    echo "gpu_check: put their wheels (Python 3.12, manylinux x86_64) in .whl/ as docs/gpu.md shows, and run again" >&2
    exit 2
fi

"$PYTHON" - <<'EOF' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device here; this check is for a machine with a GPU")
name = torch.cuda.get_device_name(0)
print(f"gpu_check: {name} x{torch.cuda.device_count()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"Python {sys.version.split()[0]}")
EOF

summary() {  # pytest's closing summary line in log $1 ("N passed, M skipped in 12.3s", with or without ===)
    grep -E '(passed|failed|skipped|errors?|deselected|no tests ran).* in [0-9.]+s' "$1" | tail -1
}

export MPLBACKEND=Agg
started=$SECONDS
timeout -s INT -k 30 "${KEEL_GPU_LIMIT_S:-180}" "$PYTHON" -m pytest -m gpu -n "${KEEL_GPU_WORKERS:-4}" \
    -p no:cacheprovider -rfEs 2>&1 | tee "$LOGS/gpu.log"
gpu_status=${PIPESTATUS[0]}
timeout -s INT -k 30 "${KEEL_SUITE_LIMIT_S:-270}" "$PYTHON" -m pytest -n "${KEEL_SUITE_WORKERS:-12}" \
    -m "not slow and not faults and not gpu" -p no:cacheprovider -rfE 2>&1 | tee "$LOGS/suite.log"
suite_status=${PIPESTATUS[0]}

echo
echo "gpu_check: $((SECONDS - started)) s; logs in $LOGS"
echo "gpu tests (python -m pytest -m gpu), exit $gpu_status: $(summary "$LOGS/gpu.log")"
echo "default suite (-m 'not slow and not faults and not gpu'), exit $suite_status: $(summary "$LOGS/suite.log")"
[ "$gpu_status" -eq 0 ] && [ "$suite_status" -eq 0 ]
