# Groups `perf report --stdio --sort comm,dso,symbol` lines (overhead %,
# comm, dso, symbol) into the stages of backstop's stream; prints each
# stage's share of backstop's samples and that share of `own` as CPU-seconds
# per raw GB. Input variables: own = backstop's own CPU-seconds for the dump
# (measured without perf), m = "PLAIN STORED" bytes of the dump (to split
# SHA-256 between the two hashes), raw = raw dump bytes.
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
  printf "| stage | share of backstop's CPU | CPU-s per raw GB |\n|---|---:|---:|\n"
  n = asorti(cost, keys)
  for (i = 1; i <= n; i++) {
    k = keys[i]
    printf "| %-44s | %5.1f %% | %5.2f |\n", k, 100 * cost[k] / total, own * cost[k] / total / gb
  }
  printf "| %-44s | %5.1f %% | %5.2f |\n", "backstop in all", 100, own / gb
  printf "\n(under perf, pg_dump took %.0f %% of the samples, backstop %.0f %%)\n", pgdump, total
}
