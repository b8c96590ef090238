#!/usr/bin/env bash
# Copy the finished runs of a sweep (those with done.json) from one directory to another, without
# checkpoints or lock files. runs/ is not kept in git and a checkout may start empty, so a study run
# over several sittings keeps its finished runs in git (docs/study_rl_cpu.md, "Sittings"):
#   scripts/keep_runs.sh runs/study_rl_cpu docs/study_rl_cpu/runs   # after a sitting: keep them
#   scripts/keep_runs.sh docs/study_rl_cpu/runs runs/study_rl_cpu   # before the next: `rlora sweep` skips them
# A run already finished in the destination is left as it is; unfinished runs are not copied.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 SRC_SWEEP_DIR DST_DIR" >&2
  exit 2
fi
src=$1
dst=$2
if [ ! -d "$src" ]; then
  echo "$0: no sweep directory $src" >&2
  exit 1
fi
mkdir -p "$dst"
[ -f "$src/sweep.json" ] && cp "$src/sweep.json" "$dst/"
[ -f "$src/sweep.yaml" ] && cp "$src/sweep.yaml" "$dst/"
kept=0
for d in "$src"/*/; do
  name=$(basename "$d")
  [ -f "$src/$name/done.json" ] || continue
  [ -f "$dst/$name/done.json" ] && continue
  tar -C "$src" --exclude=checkpoints --exclude=.lock -cf - "$name" | tar -C "$dst" -xf -
  kept=$((kept + 1))
done
echo "$kept finished runs copied from $src to $dst"
