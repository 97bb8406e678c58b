# shellcheck shell=bash
# The per-node health check before training. Sourced by launch/common.sh, never run.

# Runs on every node (one task per node) before training. Prints "HEALTH OK <node>" or
# "HEALTH FAIL <node>: <reasons>". Fast: a few seconds per node.
mm_node_health() {
  local node="${SLURMD_NODENAME:-$(hostname -s)}" g="${MM_GPUS_PER_NODE:-0}" d probe
  local -a fails=()
  if [ "$g" -gt 0 ]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
      fails+=("nvidia-smi not found")
    else
      local n ecc apps
      n="$(timeout 30 nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
      [ "$n" -ge "$g" ] || fails+=("$n GPUs visible, need $g")
      ecc="$(timeout 30 nvidia-smi --query-gpu=ecc.errors.uncorrected.volatile.total \
        --format=csv,noheader 2>/dev/null | grep -cE '^[1-9][0-9]*$' || true)"
      [ "$ecc" = 0 ] || fails+=("$ecc GPUs with uncorrected ECC errors")
      apps="$(timeout 30 nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null \
        | grep -c . || true)"
      [ "$apps" = 0 ] || fails+=("$apps leftover GPU processes")
    fi
  fi
  for d in "$MM_CKPT_DIR" "$MM_LOG_DIR"; do
    probe="$d/.health-$node-$$"
    if ! { mkdir -p "$d" && : >"$probe" && rm -f "$probe"; } 2>/dev/null; then
      fails+=("cannot write $d")
    fi
  done
  if [ "${MM_HEALTH_MIN_FREE_GB:-0}" -gt 0 ]; then
    local free_kb
    free_kb="$(df -Pk "$MM_CKPT_DIR" 2>/dev/null | awk 'NR==2 {print $4}')"
    if [ -n "$free_kb" ] && [ "$free_kb" -lt $((MM_HEALTH_MIN_FREE_GB * 1024 * 1024)) ]; then
      fails+=("less than ${MM_HEALTH_MIN_FREE_GB} GB free in $MM_CKPT_DIR")
    fi
  fi
  local p
  while IFS= read -r p; do
    [ -n "$p" ] || continue
    { [ -r "$p.bin" ] && [ -r "$p.idx" ]; } || fails+=("data prefix $p (.bin/.idx) not readable")
  done < <(mm_blend_prefixes "${MM_DATA_BLEND:-}")
  if [ "${MM_HEALTH_PYTHON:-1}" = 1 ]; then
    local out
    if ! out="$(timeout 120 "$MM_PYTHON" - "$g" 2>&1 <<'EOF'
import sys
import torch
need = int(sys.argv[1])
if need > 0:
    have = torch.cuda.device_count()
    if have < need:
        sys.exit(f"torch sees {have} CUDA devices, need {need}")
    for i in range(need):
        x = torch.ones(256, 256, device=f"cuda:{i}")
        if float((x @ x).sum()) != 256.0 ** 3:
            sys.exit(f"wrong matmul result on cuda:{i}")
    torch.cuda.synchronize()
EOF
    )"; then
      fails+=("python/torch check failed: $(printf '%s' "$out" | tail -n 1)")
    fi
  fi
  if [ "${#fails[@]}" -eq 0 ]; then
    echo "HEALTH OK $node"
    return 0
  fi
  local IFS=';'
  echo "HEALTH FAIL $node: ${fails[*]}"
  return 1
}

# Failures that are the job's (its settings, data or storage) when a single node reports them.
_MM_JOB_LEVEL_FAIL='^(data prefix .* not readable|.*GPUs visible, need .*|torch sees .* CUDA devices, need .*|less than .* free in .*|cannot write .*)$'

# Whether the failures in health report $1 are the job's rather than its nodes': every node
# failed, with the same reasons (two or more nodes), or with job-level reasons only (one node).
# A job error is final: requeueing would fail the same way, and draining would take healthy
# nodes out of service for a typo.
mm_health_job_error() {
  local out="$1" nodes n_nodes n_fail reasons
  nodes="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | sort -u)"
  n_nodes="$(printf '%s\n' "$nodes" | grep -c . || true)"
  n_fail="$(grep -c '^HEALTH FAIL ' "$out" || true)"
  [ "$n_nodes" -ge 1 ] && [ "$n_fail" = "$n_nodes" ] || return 1
  reasons="$(sed -n 's/^HEALTH FAIL [^:]*: //p' "$out" | sort -u)"
  [ "$(printf '%s\n' "$reasons" | grep -c .)" = 1 ] || return 1
  if [ "$n_nodes" = 1 ]; then
    local r
    while IFS= read -r r; do
      [[ "$r" =~ $_MM_JOB_LEVEL_FAIL ]] || return 1
    done < <(printf '%s\n' "$reasons" | tr ';' '\n')
  fi
  printf '%s\n' "$reasons"
}

# Runs mm_node_health on every node. Returns 0 when all pass; 1 and names the bad nodes when
# some fail (node faults: requeue, optionally drain); 2 when every node failed the same way
# (a job error: final, nothing drained).
mm_health_check() {
  if [ "$MM_HEALTH_CHECK" != 1 ]; then
    mm_log "health check skipped (MM_HEALTH_CHECK=0)"
    return 0
  fi
  local out="$MM_STATE_DIR/health-${SLURM_JOB_ID:-0}.txt" rc=0 nodes bad ok
  mm_log "health check on $SLURM_JOB_NUM_NODES nodes (timeout ${MM_HEALTH_TIMEOUT}s)"
  mm_srun_common
  # shellcheck disable=SC2016,SC2154  # expanded on each node; _mm_srun: mm_srun_common
  timeout --kill-after=15 "$MM_HEALTH_TIMEOUT" "${_mm_srun[@]}" \
    --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --ntasks="$SLURM_JOB_NUM_NODES" \
    bash -c 'source "$MM_REPO/launch/common.sh" && mm_node_health' >"$out" 2>&1 || rc=$?
  grep -E '^HEALTH ' "$out" | sort | while IFS= read -r line; do mm_log "$line"; done
  nodes="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null || true)"
  ok="$(sed -n 's/^HEALTH OK //p' "$out" | sort -u)"
  bad="$(comm -23 <(printf '%s\n' "$nodes" | sort -u) <(printf '%s\n' "$ok"))"
  if [ "$rc" = 0 ] && [ -z "$bad" ]; then
    mm_log "health check passed"
    return 0
  fi
  [ "$rc" != 124 ] || mm_log "health check timed out after ${MM_HEALTH_TIMEOUT}s"
  bad="$(printf '%s' "$bad" | tr '\n' ' ')"
  mm_log "health check FAILED (status $rc) on: ${bad:-unknown}; output in $out"
  local same
  if same="$(mm_health_job_error "$out")"; then
    _mm_health_job_error="the health check failed the same way on every node ($same): a problem of the job's settings, data or storage, not of a node; fix it and resubmit (not requeued, no node drained)"
    mm_log "health check: job error, not a node fault: $same"
    return 2
  fi
  if [ "$MM_DRAIN_BAD_NODES" = 1 ] && [ -n "$bad" ]; then
    local n
    for n in $bad; do
      if scontrol update NodeName="$n" State=DRAIN Reason="mm health check failed (job $SLURM_JOB_ID)"; then
        mm_log "drained node $n"
      else
        mm_log "warning: could not drain node $n"
      fi
    done
  fi
  return 1
}

