# Groups `perf report --stdio --sort comm,dso,symbol` lines (overhead %,
# comm, dso, symbol) into the stages of backstop's stream; prints a table of
# CPU-seconds per raw GB. Input variables: m = "PLAIN STORED" bytes of the
# dump (to split SHA-256 between the two hashes), raw = raw dump bytes.
# Total samples come from perf's own header ("# Samples: N").
/^# Samples:/ { samples = $3; if (samples ~ /K$/) samples = substr(samples, 1, length(samples) - 1) * 1000 }
/^#/ || NF < 4 { next }
{
  pct = $1; sub(/%/, "", pct); comm = $2; dso = $3
  sym = ""; for (i = 4; i <= NF; i++) sym = sym " " $i
  if (comm ~ /^pg_dump/) { pgdump += pct; next }
  if (dso ~ /libzstd/ || sym ~ /ZSTD|HUF_|FSE_/) s = "compression (zstd)"
  else if (sym ~ /sha256|sha2::|Sha256/) s = "sha256"
  else if (sym ~ /chacha|poly1305|ChaCha|Poly1305|age::|age_core/) s = "encryption (age: ChaCha20-Poly1305)"
  else if (sym ~ /RowCounter|rows::|backstop_dump/) s = "row counting"
  else if (sym ~ /crc32|aws_|hyper|h2::|rustls|aws_lc|smithy/) s = "S3 client (HTTP, CRC32C, TLS-free loopback)"
  else if (sym ~ /memcpy|memmove|memset|__memcpy|__memmove/) s = "memory copies"
  else if (dso ~ /kernel/) s = "kernel (pipe reads, sockets, page faults)"
  else s = "other (runtime, allocator, channels)"
  cost[s] += pct; total += pct
}
END {
  split(m, b, " ")
  plain = b[1] + 0; stored = b[2] + 0
  if (plain + stored > 0 && ("sha256" in cost)) {
    cost["sha256 of the plain dump"] = cost["sha256"] * plain / (plain + stored)
    cost["sha256 of the stored bytes"] = cost["sha256"] * stored / (plain + stored)
    delete cost["sha256"]
  }
  gb = raw / 1e9
  secs = samples * sec_per_sample
  printf "| stage | share of backstop's CPU | CPU-s per raw GB |\n|---|---:|---:|\n"
  n = asorti(cost, keys)
  for (i = 1; i <= n; i++) {
    k = keys[i]
    printf "| %-44s | %5.1f %% | %5.2f |\n", k, 100 * cost[k] / total, secs * cost[k] / 100 / gb
  }
  printf "| %-44s | %5.1f %% | %5.2f |\n", "backstop in all", 100, secs * total / 100 / gb
  printf "\n(pg_dump: %.2f CPU-s per raw GB, not counted above)\n", secs * pgdump / 100 / gb
}
