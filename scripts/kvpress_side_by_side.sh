#!/usr/bin/env bash
# Side-by-side benchmark of longattn's KV-cache eviction against NVIDIA kvpress 0.5.5
# (longattn.bench.kvpress_side), on stories260K, the same sampled prompts and the same budget.
#
# What it does:
#   1. kvpress 0.5.5 pins transformers>=4.56,<5.3 and fails on the venv's newer transformers, so
#      it installs transformers 5.2.0, kvpress 0.5.5 and the pure-python / wheel dependencies
#      kvpress needs to import into a --target folder ($KVP_DIR, default /tmp/kvp52) that shadows
#      the venv only when put on PYTHONPATH. Every package is pinned and installed with --no-deps,
#      so torch is never installed or upgraded: the venv's torch is used. A stamp file named after
#      the hash of the pin list makes this step idempotent (re-run only when the pins change).
#   2. Checks that environment imports torch from the venv and transformers 5.2.0 from $KVP_DIR.
#   3. Runs the kvpress side (PYTHONPATH=$KVP_DIR) and the longattn side (the venv as it is) in two
#      processes, each writing JSON records to $OUT, then prints the merged markdown table (also
#      written to $OUT/table.md).
#
# Usage: scripts/kvpress_side_by_side.sh [run options passed to both sides, e.g. --n-prompts 2 --budget 64;
#        not --methods, whose names differ between the sides]
# Environment: PY (default .venv/bin/python), KVP_DIR (default /tmp/kvp52), OUT (default bench-out/kvpress_side).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
KVP_DIR=${KVP_DIR:-/tmp/kvp52}
OUT=${OUT:-bench-out/kvpress_side}

# transformers 5.2.0 + kvpress 0.5.5, and what `import kvpress` needs beyond the venv
# (huggingface-hub < 2 and tokenizers <= 0.23.0 for transformers 5.2; httpx for huggingface-hub 1.x;
# requests, cachetools, fire, datasets imported at module level by kvpress's presses)
PINS=(
  "transformers==5.2.0" "kvpress==0.5.5"
  "huggingface-hub==1.33.0" "tokenizers==0.22.2" "httpx==0.28.1" "httpcore==1.0.9" "certifi==2026.10.18"
  "requests==2.34.2" "urllib3==2.8.0" "charset-normalizer==3.5.2"
  "cachetools==5.5.2" "fire==0.6.0" "termcolor==3.3.0" "six==1.17.0"
  "datasets==5.2.0" "pyarrow==26.0.1" "pandas==2.3.3" "pytz==2026.6" "dill==0.4.1" "multiprocess==0.70.19"
  "xxhash==4.1.0"
)
stamp="$KVP_DIR/.installed-$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing kvpress 0.5.5 + transformers 5.2.0 into $KVP_DIR (--no-deps, torch untouched)" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$KVP_DIR" "${PINS[@]}"
  touch "$stamp"
fi

PYTHONPATH="$KVP_DIR" "$PY" - "$KVP_DIR" <<'EOF'
import sys, os
import torch, transformers, kvpress
kvp = os.path.realpath(sys.argv[1])
assert not os.path.realpath(torch.__file__).startswith(kvp), f"torch imported from {kvp}: {torch.__file__}"
assert transformers.__version__ == "5.2.0", transformers.__version__
print(f"kvpress env: torch {torch.__version__} (venv), transformers {transformers.__version__}, kvpress from "
      f"{os.path.dirname(kvpress.__file__)}", file=sys.stderr)
EOF

mkdir -p "$OUT"
PYTHONPATH="$KVP_DIR" "$PY" -m longattn.bench.kvpress_side run --side kvpress --out "$OUT/kvpress.json" "$@"
"$PY" -m longattn.bench.kvpress_side run --side longattn --out "$OUT/longattn.json" "$@"
"$PY" -m longattn.bench.kvpress_side table "$OUT/kvpress.json" "$OUT/longattn.json" --out "$OUT/table.md"
