#!/bin/bash
# Shared by the analysis scripts: `field <model> "<store and flags>" <key>` prints one field of
# `tiller reward eval`'s report.json (the printed Markdown is for people, not scripts), a float
# with `DIGITS` decimals (default 3), "n/a" for a missing value. Needs `T`, the tiller binary.
field() {
    local model=$1 store=$2 key=$3 dir
    dir=$(mktemp -d)
    "$T" reward eval --model "$model" --store $store --out "$dir/eval" >/dev/null
    python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v=v[k]
print("n/a" if v is None else f"{v:.{int(sys.argv[3])}f}" if isinstance(v, float) else v)' \
        "$dir/eval/report.json" "$key" "${DIGITS:-3}"
    rm -rf "$dir"
}
