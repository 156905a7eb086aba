#!/usr/bin/env bash
# Benchmark: issue 18's wall-time and CPU targets, as medians. On a noisy
# 2-core VM one run per row swings more than the targets' margins (the same
# ceiling measured 3.5–7.3 s within an hour), so this runs the three rows
# the targets compare, interleaved and in rotating order, REPEAT times on
# one database and one S3 server, and prints every run, the medians and
# the ratios:
#
#   ceiling   pg_dump -Fc -Z0 > /dev/null
#   pipeline  pg_dump -Fc -Z0 | zstd -3 -T0 | age -r KEY | aws s3 cp -
#   backstop  backstop backup with the default settings
#
# Targets: backstop's wall ≤ 1.10 × max(ceiling, its 2-core floor) and
# ≤ 0.8 × the pipeline's; backstop's own CPU (its tree minus pg_dump's, the
# ceiling's CPU) ≤ 0.8 × the pipeline's own (zstd + age + aws).
#
# Usage: bench/targets.sh [SCALE] [EXTRA_ROWS] [REPEAT]
#   defaults 30 3000000 5: the JSON/text-heavy set (about 0.93 GB raw).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
scale=${1:-30}
extra=${2:-3000000}
repeat=${3:-5}
# shellcheck source=lib.sh
. "$repo/bench/lib.sh"
bench_setup "$scale" "$extra"
bench_config
bench_job defaults

pgdump=(env PGPASSWORD="$PG_PASSWORD" pg_dump -h 127.0.0.1 -p "$PG_PORT" -U postgres)
pipeline="$(printf '%q ' "${pgdump[@]}") -Fc -Z0 bench | zstd -q -3 -T0 | age -r '$recipient' | aws s3 cp --quiet --expected-size $raw --endpoint-url '$endpoint' - s3://bench/pipe/dump.zst.age"

# run ROW: one measured run of ROW (a table row); appends "ROW wall cpu
#   server rss" to $work/runs.
run() {
  local row=$1
  case $row in
    ceiling) measure "$row" "${pgdump[@]}" -Fc -Z0 bench ;;
    pipeline) measure "$row" bash -o pipefail -c "$pipeline" ;;
    backstop) measure "$row" "$bin" --config "$work/backstop.toml" backup --job defaults ;;
  esac
  echo "$row $(cat "$work/last")" >> "$work/runs"
}

echo
echo "machine: $(nproc) cores; $(pg_dump --version); $(zstd --version | head -n1); age $(age --version)"
echo "database: pgbench scale $scale + $extra event rows and the shapes of bench/lib.sh; raw dump $(awk -v b="$raw" 'BEGIN {printf "%.2f GB", b/1e9}'); $repeat rounds"
echo
export MEASURE_SERVER=1
echo "| row | wall s | CPU s | peak RSS MiB | server CPU s | 2-core floor s |"
echo "|---|---:|---:|---:|---:|---:|"
: > "$work/runs"
# One warm-up round, not counted (caches, the first S3 bucket writes).
for row in ceiling pipeline backstop; do run "$row" >/dev/null; done
: > "$work/runs"
rows=(ceiling pipeline backstop)
for i in $(seq "$repeat"); do
  # Rotate the order so no row always runs after the same one.
  for j in 0 1 2; do run "${rows[$(((i + j) % 3))]}"; done
done

echo
awk '
  function median(a, n,   i, j, t) {
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  {
    n[$1]++
    wall[$1, n[$1]] = $2; cpu[$1, n[$1]] = $3
    floor[$1, n[$1]] = ($3 + $4) / 2
  }
  END {
    for (r in n) {
      k = n[r]
      for (i = 1; i <= k; i++) { w[i] = wall[r, i]; c[i] = cpu[r, i]; f[i] = floor[r, i] }
      mw[r] = median(w, k); mc[r] = median(c, k); mf[r] = median(f, k)
      printf "median %-9s wall %6.2f s  CPU %6.2f s  2-core floor %6.2f s  (wall min %.2f, max %.2f)\n", r, mw[r], mc[r], mf[r], w[1], w[k]
    }
    bound = (mw["ceiling"] > mf["backstop"]) ? mw["ceiling"] : mf["backstop"]
    printf "\nwall / max(ceiling, floor): %.2f x  (target <= 1.10)\n", mw["backstop"] / bound
    printf "wall / shell pipeline:      %.2f x  (target <= 0.80)\n", mw["backstop"] / mw["pipeline"]
    printf "own CPU / pipeline own CPU: %.2f x  (target <= 0.80; both minus pg_dump, %.2f s)\n", (mc["backstop"] - mc["ceiling"]) / (mc["pipeline"] - mc["ceiling"]), mc["ceiling"]
  }
' "$work/runs"
