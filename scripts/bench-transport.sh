#!/usr/bin/env bash
# Transport data path vs ucx_perftest, per UCX transport list, side by side as JSON on stdout.
#
#   scripts/bench-transport.sh [TLS ...]        default: tcp  posix,sysv,cma,self
#
# For each TLS list it runs, on 127.0.0.1 only:
#   * ucx_perftest -t ucp_put_bw (server in the background on a free port, client against it),
#     once with ROW_BYTES messages and once with LARGE_PUT_BYTES messages, UCX_TLS=<TLS>
#     (and UCX_NET_DEVICES=lo when the list contains tcp), iterations bounded by -n;
#   * kvrecall-bench transport --json with the same sizes and transports, into a 64 MiB region and
#     into a cache-sized ("hot") one (see run_ours below).
# Environment knobs (defaults in brackets):
#   KVRECALL_BENCH [build/bin/kvrecall-bench]  ROW_BYTES [512]  ROWS_PER_PUT_BATCH [1024]
#   LARGE_PUT_BYTES [4194304]  BENCH_SECONDS [3]  BENCH_THREADS [1]  REGION_BYTES [67108864]
#   PERFTEST_ITERS_SMALL [200000 for tcp, 2000000 otherwise]
#   PERFTEST_ITERS_LARGE [200 for tcp, 2000 otherwise]  PERFTEST_TIMEOUT [120 s per run]
# Needs: ucx_perftest (Debian package ucx-utils), jq, ss.
set -euo pipefail

cd "$(dirname "$0")/.."
BENCH=${KVRECALL_BENCH:-build/bin/kvrecall-bench}
ROW_BYTES=${ROW_BYTES:-512}
ROWS_PER_PUT_BATCH=${ROWS_PER_PUT_BATCH:-1024}
LARGE_PUT_BYTES=${LARGE_PUT_BYTES:-4194304}
BENCH_SECONDS=${BENCH_SECONDS:-3}
BENCH_THREADS=${BENCH_THREADS:-1}
PERFTEST_TIMEOUT=${PERFTEST_TIMEOUT:-120}

for tool in ucx_perftest jq ss; do
  command -v "$tool" >/dev/null || { echo "bench-transport: $tool not found" >&2; exit 1; }
done
[[ -x "$BENCH" ]] || { echo "bench-transport: $BENCH not built (or set KVRECALL_BENCH)" >&2; exit 1; }

if [[ $# -eq 0 ]]; then set -- tcp posix,sysv,cma,self; fi

server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then kill "$server_pid"; fi
}
trap cleanup EXIT

free_port() {
  local port
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 20000))
    if [[ -z "$(ss -ltnH "sport = :$port")" ]]; then echo "$port"; return; fi
  done
  echo "bench-transport: no free port" >&2; exit 1
}

# perftest SIZE ITERS -> JSON of its "Final:" line. Env: UCX_TLS (+ UCX_NET_DEVICES) exported.
perftest() {
  local size=$1 iters=$2 port out warmup
  port=$(free_port)
  warmup=$(( iters / 10 > 0 ? iters / 10 : 1 ))
  timeout "$PERFTEST_TIMEOUT" ucx_perftest -p "$port" >/dev/null 2>&1 &
  server_pid=$!
  # The server prints nothing until a client connects; retry until it listens.
  for _ in $(seq 50); do
    [[ -n "$(ss -ltnH "sport = :$port")" ]] && break
    sleep 0.1
  done
  out=$(timeout "$PERFTEST_TIMEOUT" ucx_perftest 127.0.0.1 -p "$port" -t ucp_put_bw \
          -s "$size" -n "$iters" -w "$warmup" 2>&1) || {
    echo "bench-transport: ucx_perftest failed:" >&2; echo "$out" >&2; exit 1; }
  wait "$server_pid" || true
  server_pid=""
  # Final: iters  lat50%(us)  lat_avg(us)  lat_overall(us)  bw_avg(MB/s)  bw_overall(MB/s)
  #        msgrate_avg  msgrate_overall      (perftest's MB is 2^20 bytes)
  echo "$out" | awk -v size="$size" '/Final:/ {
    printf "{\"message_bytes\": %s, \"iterations\": %s, \"latency_p50_us\": %s, ", size, $2, $3
    printf "\"latency_avg_us\": %s, \"mib_per_s\": %s, \"gb_per_s\": %.4f, \"msgs_per_s\": %s}\n",
           $5, $7, $7 * 1048576 / 1e9, $9 }'
}

# run_ours TLS NET_DEVICES REGION_BYTES -> the bench's JSON
run_ours() {
  env -u UCX_TLS -u UCX_NET_DEVICES "$BENCH" transport --json --transports="$1" \
    --net_devices="$2" --region_bytes="$3" --row_bytes="$ROW_BYTES" \
    --rows_per_put_batch="$ROWS_PER_PUT_BATCH" --large_put_bytes="$LARGE_PUT_BYTES" \
    --seconds="$BENCH_SECONDS" --threads="$BENCH_THREADS"
}

# ucx_perftest puts to one remote buffer over and over (cache-resident on shared memory). Our bench
# runs twice: into a REGION_BYTES region (rows scattered over DRAM, the realistic case) and into
# the smallest region that holds one batch / one large put ("hot", the like-for-like case).
REGION_BYTES=${REGION_BYTES:-67108864}
batch_bytes=$(( ROW_BYTES * ROWS_PER_PUT_BATCH ))
HOT_REGION_BYTES=$(( batch_bytes > LARGE_PUT_BYTES ? batch_bytes : LARGE_PUT_BYTES ))

results="[]"
for tls in "$@"; do
  export UCX_TLS="$tls"
  net_devices=""
  if [[ ",$tls," == *",tcp,"* ]]; then
    export UCX_NET_DEVICES=lo
    net_devices=lo
    iters_small=${PERFTEST_ITERS_SMALL:-200000}
    iters_large=${PERFTEST_ITERS_LARGE:-200}
  else
    unset UCX_NET_DEVICES
    iters_small=${PERFTEST_ITERS_SMALL:-2000000}
    iters_large=${PERFTEST_ITERS_LARGE:-2000}
  fi
  echo "bench-transport: UCX_TLS=$tls: ucx_perftest ..." >&2
  pt_small=$(perftest "$ROW_BYTES" "$iters_small")
  pt_large=$(perftest "$LARGE_PUT_BYTES" "$iters_large")

  echo "bench-transport: UCX_TLS=$tls: kvrecall-bench transport ..." >&2
  # Our bench sets TLS / devices per context itself; keep the environment out of it.
  ours=$(run_ours "$tls" "$net_devices" "$REGION_BYTES")
  ours_hot=$(run_ours "$tls" "$net_devices" "$HOT_REGION_BYTES")

  results=$(jq -n --argjson acc "$results" --arg tls "$tls" --argjson small "$pt_small" \
      --argjson large "$pt_large" --argjson ours "$ours" --argjson hot "$ours_hot" '$acc + [{
        tls: $tls,
        ucx_perftest: {put_bw_small: $small, put_bw_large: $large},
        kvrecall: $ours,
        kvrecall_hot: $hot,
        side_by_side: {
          small_msgs_per_s: {ucx_perftest: $small.msgs_per_s, kvrecall: $ours.scattered.rows_per_s,
                             kvrecall_hot: $hot.scattered.rows_per_s},
          small_gb_per_s: {ucx_perftest: $small.gb_per_s, kvrecall: $ours.scattered.gb_per_s,
                           kvrecall_hot: $hot.scattered.gb_per_s},
          large_gb_per_s: {ucx_perftest: $large.gb_per_s, kvrecall: $ours.contiguous.gb_per_s,
                           kvrecall_hot: $hot.contiguous.gb_per_s},
          small_ratio_hot: ($hot.scattered.gb_per_s / $small.gb_per_s),
          large_ratio_hot: ($hot.contiguous.gb_per_s / $large.gb_per_s)
        }}]')
done
unset UCX_TLS UCX_NET_DEVICES

jq -n --argjson results "$results" --arg host "$(uname -n)" --arg cpus "$(nproc)" \
  --arg kernel "$(uname -r)" --arg date "$(date -u +%FT%TZ)" \
  --arg ucx "$(ucx_info -v | awk '/Version/ {print $3}')" \
  --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
  '{machine: {host: $host, cpus: ($cpus | tonumber), kernel: $kernel, ucx: $ucx,
              loadavg_at_end: $load},
    date: $date, results: $results}'
