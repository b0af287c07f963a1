#!/usr/bin/env bash
# N training processes on this machine, each with its share of the devices: the
# multi-host test bed (CPU by default), also usable on one multi-GPU host.
#
#   launch/local.sh N CONFIG [section.key=value ...]
#
# Environment:
#   WORKDIR   run directory, local or a bucket (gs://...; default runs/local)
#   LOGDIR    where processes i>0 log (default $WORKDIR/logs; runs/local-logs for a bucket)
#   DEVICES   devices in total, split evenly over the N processes (default 8)
#   PLATFORM  cpu (default: DEVICES host CPU devices) or gpu (process i gets GPUs
#             i*DEVICES/N .. (i+1)*DEVICES/N-1 through JAX_LOCAL_DEVICE_IDS)
#   PORT      coordinator port on localhost (default: a free one)
#   PYTHON    interpreter (default: python)
# Process 0 prints to the terminal; process i>0 logs to $LOGDIR/process_i.log.
# SIGTERM is forwarded to every process (preemption: checkpoint and exit 0). The processes
# run in their own sessions, so a terminal's Ctrl-C reaches only this script: the first is
# forwarded as SIGTERM (JAX's preemption sync handles SIGTERM, not SIGINT: save and stop
# at a step every process agrees on), a second kills them (stop now, as for one process);
# if one process fails the others are stopped, and the first non-zero status is returned.
set -u
if [ $# -lt 2 ]; then
  echo "usage: $0 N CONFIG [section.key=value ...]" >&2; exit 2
fi
N=$1; CONFIG=$2; shift 2
WORKDIR=${WORKDIR:-runs/local}
DEVICES=${DEVICES:-8}
PLATFORM=${PLATFORM:-cpu}
PYTHON=${PYTHON:-python}
case "$N" in ''|*[!0-9]*|0) echo "$0: N=$N must be a positive integer" >&2; exit 2;; esac
if [ $((DEVICES % N)) -ne 0 ]; then
  echo "$0: DEVICES=$DEVICES is not divisible by N=$N processes" >&2; exit 2
fi
PER=$((DEVICES / N))
PORT=${PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
case "$WORKDIR" in
  *://*) LOGDIR=${LOGDIR:-runs/local-logs} ;;
  *) LOGDIR=${LOGDIR:-$WORKDIR/logs} ;;
esac
mkdir -p "$LOGDIR"

pids=()
forward() { [ ${#pids[@]} -gt 0 ] && kill -s "$1" "${pids[@]}" 2>/dev/null; }
interrupts=0
on_int() { interrupts=$((interrupts + 1)); forward "$([ $interrupts -eq 1 ] && echo TERM || echo KILL)"; }
trap 'forward TERM' TERM
trap on_int INT
for ((i = 0; i < N; i++)); do
  env_args=(JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i")
  if [ "$PLATFORM" = cpu ]; then
    env_args+=(JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$PER")
  else
    env_args+=(JAX_LOCAL_DEVICE_IDS="$(seq -s, $((i * PER)) $(((i + 1) * PER - 1)))")
  fi
  if [ "$i" -eq 0 ]; then
    setsid env "${env_args[@]}" "$PYTHON" -m cm3leon_jax.cli train --config "$CONFIG" \
      --workdir "$WORKDIR" "$@" &
  else
    setsid env "${env_args[@]}" "$PYTHON" -m cm3leon_jax.cli train --config "$CONFIG" \
      --workdir "$WORKDIR" "$@" > "$LOGDIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
running=("${pids[@]}")
while [ ${#running[@]} -gt 0 ]; do
  finished=
  wait -n -p finished "${running[@]}"  # bash >= 5.1
  rc=$?
  [ -z "${finished:-}" ] && continue  # woken by a forwarded signal, nobody exited yet
  running=($(printf '%s\n' "${running[@]}" | grep -vx "$finished"))
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then
    status=$rc
    forward TERM  # the others would wait for the lost process forever
  fi
done
exit $status
