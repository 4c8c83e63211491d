#!/usr/bin/env bash
# Runs `python -m pip install ARGS...` up to FX_MLA_PIP_TRIES times (default 5), sleeping longer between tries.
# A network hiccup while fetching a large wheel (triton is ~290 MB) then costs a retry, not the CI run.
# Usage: tools/pip_retry.sh PYTHON ARGS...
set -uo pipefail
py="$1"; shift
tries="${FX_MLA_PIP_TRIES:-5}"
resume=()
# pip >= 25.1 can resume an interrupted download; older pips (before the upgrade step) reject the flag.
if "$py" -m pip install --help 2>/dev/null | grep -q -- '--resume-retries'; then
    resume=(--resume-retries 20)
fi
for ((i = 1; i <= tries; i++)); do
    if "$py" -m pip install "${resume[@]}" "$@"; then
        exit 0
    fi
    if ((i < tries)); then
        wait_s=$((15 * i))
        echo "pip install $* failed (try $i of $tries); retrying in ${wait_s}s" >&2
        sleep "$wait_s"
    fi
done
echo "pip install $* failed after $tries tries" >&2
exit 1
