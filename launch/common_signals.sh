# shellcheck shell=bash
# Signals, the training step and the time limit. Sourced by launch/common.sh, never run.
#
# The batch shell receives SIGUSR1 from `--signal=B:USR1@lead` (time limit near) or from
# `scancel --batch --signal=USR1` (preemption notice): stop gracefully, then requeue.
# SIGUSR2: stop gracefully and do not requeue. SIGTERM (scancel, scontrol requeue, time limit
# reached, node failure, SLURM preemption): SLURM also sends it to every process of the
# training step itself; the program saves and exits 75, and SLURM decides what follows.
#
# How a stop reaches the training ranks: the stop file (MM_STOP_FILE, polled by every rank
# at each step boundary) reaches only them; the forwarded SIGUSR1 reaches every process of
# the step (srun and slurmstepd signal them all), so the training program's helpers (the
# checkpoint writers) ignore it. The forward is skipped while the step is starting: a task
# that has not yet installed its handlers would die of it, and the stop file is enough.

# Seconds after the launch of the training step during which SIGUSR1 is not forwarded.
_MM_STARTUP_NO_FORWARD_S=10

# A signal name for an exit status above 128 ("SIGKILL" for 137), else nothing.
mm_status_signal() {
  local rc="$1" name
  [[ "$rc" =~ ^[0-9]+$ ]] && [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ] || return 0
  name="$(kill -l "$((rc - 128))" 2>/dev/null)" || return 0
  printf 'SIG%s\n' "${name#SIG}"
}

# "status 138 (killed by SIGUSR1)" or "status 1".
mm_status_text() {
  local sig
  sig="$(mm_status_signal "$1")"
  if [ -n "$sig" ]; then
    printf 'status %s (killed by %s)\n' "$1" "$sig"
  else
    printf 'status %s\n' "$1"
  fi
}

mm_on_signal() {
  local sig="$1"
  _mm_stop_signal="$sig"
  case "$sig" in
    USR2) _mm_no_requeue_reason="SIGUSR2 asked for a stop without requeue" ;;
    TERM) _mm_no_requeue_reason="SIGTERM: the job is being cancelled, requeued by SLURM, preempted or timed out; SLURM decides what follows" ;;
    USR1)
      if [ -n "${_mm_lead_problem:-}" ]; then
        _mm_no_requeue_reason="$_mm_lead_problem"
      fi
      ;;
  esac
  mm_log "received SIG$sig: asking the training program to stop at the next step boundary$(mm_time_left_text)"
  if [ -n "${MM_STOP_FILE:-}" ]; then
    : >"$MM_STOP_FILE" 2>/dev/null || mm_log "warning: cannot create stop file $MM_STOP_FILE"
  fi
  if [ -n "${_mm_step_pid:-}" ] && kill -0 "$_mm_step_pid" 2>/dev/null; then
    if [ $((SECONDS - _mm_step_started)) -lt "$_MM_STARTUP_NO_FORWARD_S" ]; then
      mm_log "the training step started $((SECONDS - _mm_step_started)) s ago: not forwarding the signal (the stop file asks for the stop)"
      return 0
    fi
    # srun forwards SIGUSR1 to every task of the step. Always USR1: srun answers SIGTERM by
    # killing the tasks; the program treats USR1 and TERM alike.
    kill -s USR1 "$_mm_step_pid" 2>/dev/null || true
  fi
}

mm_install_traps() {
  _mm_stop_signal=
  _mm_step_pid=
  trap 'mm_on_signal USR1' USR1
  trap 'mm_on_signal USR2' USR2
  trap 'mm_on_signal TERM' TERM
}

# Run "$@" (the training srun) in the background and wait for it, so that traps fire at once.
mm_run_step() {
  "$@" &
  _mm_step_pid=$!
  _mm_step_started=$SECONDS
  local rc
  while :; do
    rc=0
    wait "$_mm_step_pid" || rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$_mm_step_pid" 2>/dev/null; then
      continue   # wait was interrupted by a trapped signal; the step is still running
    fi
    break
  done
  _mm_step_pid=
  return "$rc"
}

# ----------------------------------------------------------------------------- time limit
# Seconds in a SLURM duration (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); nothing for
# UNLIMITED or anything unparsable.
mm_duration_seconds() {
  local t="$1" d=0 a b c
  if [[ "$t" =~ ^([0-9]+)-(.*)$ ]]; then
    d="${BASH_REMATCH[1]}"
    t="${BASH_REMATCH[2]}"
    IFS=: read -r a b c <<<"$t"
    [[ "$a" =~ ^[0-9]+$ ]] || return 0
    printf '%s\n' $((10#$d * 86400 + 10#$a * 3600 + 10#${b:-0} * 60 + 10#${c:-0}))
    return 0
  fi
  [[ "$t" =~ ^[0-9]+(:[0-9]+){0,2}$ ]] || return 0
  IFS=: read -r a b c <<<"$t"
  if [ -n "$c" ]; then
    printf '%s\n' $((10#$a * 3600 + 10#$b * 60 + 10#$c))
  elif [ -n "$b" ]; then
    printf '%s\n' $((10#$a * 60 + 10#$b))
  else
    printf '%s\n' $((10#$a * 60))
  fi
}

# The job's time limit in seconds (scontrol's TimeLimit), or nothing when unlimited/unknown.
mm_job_time_limit() {
  local t
  t="$(scontrol show job "${SLURM_JOB_ID:-0}" -o 2>/dev/null | tr ' ' '\n' \
    | sed -n 's/^TimeLimit=//p' | head -n1)" || true
  mm_duration_seconds "$t"
}

# The job's end time as seconds since the epoch, or nothing.
mm_job_end_epoch() {
  local t
  t="$(scontrol show job "${SLURM_JOB_ID:-0}" -o 2>/dev/null | tr ' ' '\n' \
    | sed -n 's/^EndTime=//p' | head -n1)" || true
  [[ "$t" =~ ^[0-9]{4}- ]] || return 0
  date -d "$t" +%s 2>/dev/null || true
}

# ", N s before the time limit" when the end time is known.
mm_time_left_text() {
  local end
  end="$(mm_job_end_epoch)"
  [ -n "$end" ] || return 0
  printf ', %s s before the time limit' "$((end - $(date +%s)))"
}

# "LEAD SOURCE": the time-limit warning's lead in seconds and where it was read.
# MM_SIGNAL_LEAD wins; else SBATCH_SIGNAL (sbatch's environment form of --signal, which the
# job inherits); else the submitted script's `#SBATCH --signal` line. A `--signal` on the
# sbatch command line is invisible to the job: set MM_SIGNAL_LEAD (or use SBATCH_SIGNAL).
mm_signal_lead() {
  if [ -n "${MM_SIGNAL_LEAD:-}" ]; then
    printf '%s MM_SIGNAL_LEAD\n' "$MM_SIGNAL_LEAD"
    return 0
  fi
  local spec="" src="" cmd
  if [ -n "${SBATCH_SIGNAL:-}" ]; then
    spec="$SBATCH_SIGNAL"
    src="SBATCH_SIGNAL"
  else
    cmd="$(scontrol show job "${SLURM_JOB_ID:-0}" -o 2>/dev/null | tr ' ' '\n' \
      | sed -n 's/^Command=//p' | head -n1)" || true
    if [ -n "$cmd" ] && [ -f "$cmd" ]; then
      spec="$(sed -n 's/^#SBATCH[[:space:]]*--signal[=[:space:]]*\([^[:space:]]*\).*/\1/p' \
        "$cmd" | tail -n1)"
      src="the #SBATCH --signal line of $(basename "$cmd")"
    fi
  fi
  [[ "$spec" == *@* ]] || return 0
  spec="${spec##*@}"
  [[ "$spec" =~ ^[0-9]+$ ]] || return 0
  printf '%s %s\n' "$spec" "$src"
}

# Compare the time limit with the signal lead (sets _mm_time_limit, _mm_signal_lead).
# A lead at least as long as the limit means SLURM sends the warning at once and no start
# can train: refused (status 2) when MM_SIGNAL_LEAD says so; otherwise a loud warning, and
# the first SIGUSR1 ends the job instead of requeueing it (the command line may have set
# another lead that the job cannot see).
mm_check_signal_lead() {
  local line lead src
  _mm_time_limit="$(mm_job_time_limit)"
  line="$(mm_signal_lead)"
  lead="${line%% *}"
  src="${line#* }"
  _mm_signal_lead="$lead"
  _mm_signal_lead_src="$src"
  _mm_lead_problem=
  { [ -n "$_mm_time_limit" ] && [ -n "$lead" ]; } || return 0
  if [ "$lead" -ge "$_mm_time_limit" ]; then
    local what="the time limit (${_mm_time_limit} s) is not longer than the time-limit signal's lead (${lead} s, from $src): SLURM sends SIGUSR1 at once and no start can train"
    if [ "$src" = MM_SIGNAL_LEAD ]; then
      mm_die "$what; submit with a longer --time, or a shorter --signal=B:USR1@<seconds> together with MM_SIGNAL_LEAD=<seconds>"
    fi
    mm_log "WARNING: $what. If --signal on the sbatch command line set a shorter lead, export MM_SIGNAL_LEAD=<that lead> (the job cannot see the command line). Until then a SIGUSR1 ends the job without requeue."
    _mm_lead_problem="$what (MM_SIGNAL_LEAD unset: fix --time or the lead and resubmit)"
  elif [ $((2 * lead)) -gt "$_mm_time_limit" ]; then
    mm_log "WARNING: the time-limit signal's lead (${lead} s, from $src) is more than half of the time limit (${_mm_time_limit} s): most of every start is spent stopping"
  fi
}
