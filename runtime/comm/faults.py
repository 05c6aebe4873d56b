"""When a peer fails: bounded waits and one-line errors that name the rank at fault.

A rank whose peer died (killed, crashed) or hangs must not wait forever, and its error must say
which peer it waited for. Every collective the runtime waits on from the host is bounded by
TBO_COMM_TIMEOUT_S (runtime/env.py, default 300 s):
  - gloo (torch_dist backend, agree_num_tokens): the collective itself is issued with that timeout,
    so gloo's worker thread gives up too and the process can exit (a wait-side timeout alone
    leaves the worker blocked, and the interpreter then hangs at exit);
  - NCCL: collectives are stream-ordered, a dead peer leaves a kernel spinning on the GPU; the host
    notices at its next synchronisation: `agree_num_tokens` (each PlanModule step starts with it)
    and `synchronize` below poll an event with that timeout (an engine syncing its step's output
    should use `synchronize`, not a bare `.item()`, to be bounded). torch's NCCL watchdog (the process group's own
    timeout) is the backstop for collectives outside a CUDA graph; it does not watch replays.
  - and for NCCL a watchdog thread (`StepWatchdog`, one per PlanModule with EP > 1 on CUDA): a step
    whose device work is still unfinished TBO_COMM_TIMEOUT_S after the step was issued ends the
    process with one line naming the peer. By then the host may be blocked in any CUDA call (a
    pageable copy of the next batch, a `.item()`) queued behind the spinning collective, where no
    exception can reach it: the watchdog is the one thread still able to act, as NCCL's own is.
A failure becomes `PeerFailure` (a RuntimeFailure), one line:

    rank 0: comm group 'ep' collective 'dispatch' failed after 2.0 s: peer rank 1 did not answer
    within TBO_COMM_TIMEOUT_S=2 (hung or died): <backend message>

Which peer: in a group of two it is the other rank. A rank that fails of its own error can say so
first with `announce_failure(exc)` (a key in the default c10d store; `run_ranks` does it for its
ranks); a peer's error then quotes it. In a larger group without such a report the error lists
the ranks that could be at fault, and does not claim one of them.
"""
from __future__ import annotations

import logging
import re
import time
from datetime import timedelta

import torch

from tbo_compiler.ops.errors import RuntimeFailure, one_line
from tbo_compiler.runtime.env import COMM_TIMEOUT_ENV, comm_timeout_s

log = logging.getLogger(__name__)

__all__ = ["PeerFailure", "announce_failure", "reported_failures", "peer_failure", "timed_opts", "wait_works",
           "wait_device", "bounded_collective", "synchronize", "StepWatchdog", "step_watchdog", "on_abort"]

_KEY = "tbo/failed/{}"   # global rank -> that rank's one-line error, in the default store


class PeerFailure(RuntimeFailure):
    """A collective failed because a peer rank did not take part (died, raised or hangs)."""


# Step 1: a failing rank tells its peers ---------------------------------------------------------

def _store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: peers just cannot quote this rank's error
        return None


def announce_failure(error: BaseException | str) -> bool:
    """Record in the default c10d store that this rank is failing, and why, so that a peer whose
    collective breaks because of it names this rank and quotes the reason. Call it from the handler
    that ends a rank (before exiting). A PeerFailure is not announced: that rank is not the cause."""
    import torch.distributed as dist

    if isinstance(error, PeerFailure):
        return False
    store = _store()
    if store is None:
        return False
    text = error if isinstance(error, str) else f"{type(error).__name__}: {one_line(error)}"
    try:
        store.set(_KEY.format(dist.get_rank()), text[:300])
        return True
    except Exception as e:  # noqa: BLE001 - the store may be gone with its host; nothing to do
        log.warning("could not announce this rank's failure: %s", one_line(e))
        return False


def reported_failures(group) -> dict[int, str]:
    """{group rank: its announced error} for the peers of `group` that announced a failure."""
    import torch.distributed as dist

    store = _store()
    if store is None or group.pg is None:
        return {}
    out = {}
    try:
        for r, g in enumerate(dist.get_process_group_ranks(group.pg)):
            key = _KEY.format(g)
            if r != group.rank and store.check([key]):
                out[r] = store.get(key).decode(errors="replace")
    except Exception as e:  # noqa: BLE001 - the store died with its host rank: name without reports
        log.debug("failure reports unreadable: %s", one_line(e))
    return out


# Step 2: the one-line error ----------------------------------------------------------------------

def _backend_message(e: BaseException | str) -> str:
    msg = e if isinstance(e, str) else one_line(e)
    msg = re.sub(r"^\[[^\]]*:\d+\]\s*", "", msg)           # gloo's "[.../pair.cc:537] " source prefix
    msg = msg.split(" This is typically caused")[0]          # gloo's generic advice
    return msg[:300]


def peer_failure(group, what: str, elapsed: float, timeout_s: float, error: BaseException | str) -> PeerFailure:
    """The error of rank `group.rank` whose `what` (a collective's kind) failed after `elapsed` s."""
    peers = [r for r in range(group.world) if r != group.rank]
    reported = reported_failures(group)
    timed_out = elapsed >= 0.9 * timeout_s or "timed out" in str(error).lower()
    what_happened = (f"did not answer within {COMM_TIMEOUT_ENV}={timeout_s:g} (hung or died)" if timed_out
                     else "dropped out (died or exited)")
    if reported:
        who = "; ".join(f"peer rank {r} failed ({msg})" for r, msg in sorted(reported.items()))
    elif len(peers) == 1:
        who = f"peer rank {peers[0]} {what_happened}"
    else:  # any of them could be the one: say so rather than guess
        who = f"one of peer ranks {', '.join(map(str, peers))} {what_happened}"
    return PeerFailure(f"rank {group.rank}: comm group '{group.name}' {what} failed after {elapsed:.1f} s: "
                       f"{who}: {_backend_message(error)}")


# Step 3: bounded collectives and waits -------------------------------------------------------------

def timed_opts(cls, timeout_s: float | None, **fields):
    """c10d options (AllToAllOptions, AllreduceOptions, ...), carrying `timeout_s` when given.
    Give it for gloo (its worker thread then gives up by itself), not for NCCL: there the op's
    timeout arms the watchdog, which would end the process before the wait can name the peer."""
    opts = cls()
    if timeout_s is not None:
        opts.timeout = timedelta(seconds=timeout_s)
    for k, v in fields.items():
        setattr(opts, k, v)
    return opts


def wait_works(works, group, what: str, started: float, timeout_s: float) -> None:
    """Wait for c10d work objects issued at `started` (time.monotonic); a failure or a wait past
    the timeout raises PeerFailure. On gloo the work carries the same timeout and fails by itself;
    the wait's own bound, a little later, is what ends it on other backends (NCCL's wait with a
    timeout polls, and on expiry aborts the communicator and raises)."""
    for w in works:
        bound = max(timeout_s - (time.monotonic() - started), 0.0) + 1.0 + 0.1 * timeout_s
        waited = time.monotonic()
        try:
            w.wait(timeout=timedelta(seconds=bound))
        except Exception as e:  # noqa: BLE001 - the backend's error, kept at the end of ours
            raise peer_failure(group, f"collective '{what}'", time.monotonic() - started, timeout_s, e) from e
        # a wait that came back at its bound without raising (NCCL, without blocking wait) and
        # left the work unfinished; before the bound it finished (some gloo work objects never
        # say is_completed)
        if time.monotonic() - waited >= bound and not w.is_completed():
            raise peer_failure(group, f"collective '{what}'", time.monotonic() - started, timeout_s,
                               "the collective had not completed when the wait timed out")


def wait_device(group, what: str, started: float, timeout_s: float) -> None:
    """Wait for the current CUDA stream's work so far (started at `started`), polling an event:
    past the timeout it raises PeerFailure naming `group`'s peers. Spins for the first
    milliseconds (a step's agreement usually lands there), then sleeps between polls."""
    ev = torch.cuda.Event()
    ev.record()
    t0 = time.monotonic()
    while not ev.query():
        now = time.monotonic()
        if now - started > timeout_s:
            if group is None or group.world == 1:
                raise RuntimeFailure(f"{what} did not finish within {COMM_TIMEOUT_ENV}={timeout_s:g}")
            raise peer_failure(group, what, now - started, timeout_s,
                               "the stream had not finished when the wait timed out")
        if now - t0 > 0.002:
            time.sleep(0.0002 if now - t0 < 0.05 else 0.002)


def bounded_collective(group, what: str, issue, on_cpu: bool) -> None:
    """Issue a collective whose result the host needs now and wait for it, bounded by
    TBO_COMM_TIMEOUT_S. `issue(timeout_s)` issues it on `group.pg` and returns its work; it gets the
    timeout for the c10d options on CPU backends (gloo) and None on NCCL, where the wait polls the
    stream instead (NCCL's own timed wait sleeps milliseconds between polls: coarse for a decode
    step)."""
    timeout_s, started = comm_timeout_s(), time.monotonic()
    try:
        work = issue(timeout_s if on_cpu else None)
        if not on_cpu:
            work.wait()  # orders the current stream after it (returns at once); the poll below bounds it
    except Exception as e:  # noqa: BLE001 - a peer already gone can fail the issue itself
        raise peer_failure(group, f"collective '{what}'", time.monotonic() - started, timeout_s, e) from e
    if on_cpu:
        wait_works([work], group, what, started, timeout_s)
    else:
        wait_device(group, f"collective '{what}'", started, timeout_s)


def synchronize(group_name: str = "ep", timeout_s: float | None = None) -> None:
    """Wait for the current CUDA stream's work, bounded by TBO_COMM_TIMEOUT_S: where a plain
    `.item()` or `torch.cuda.synchronize()` would spin forever behind a collective whose peer died
    (a replayed CUDA graph is not watched by NCCL's watchdog), this raises PeerFailure naming the
    peers of `group_name`. A no-op without CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    from tbo_compiler.runtime.comm import _GROUPS

    timeout_s = comm_timeout_s() if timeout_s is None else timeout_s
    wait_device(_GROUPS.get(group_name), "device work (its collectives)", time.monotonic(), timeout_s)


# Step 4: the watchdog of replayed steps ------------------------------------------------------------

_ABORT_HOOKS: list = []


def on_abort(fn) -> None:
    """Call fn(message) before the watchdog ends the process (run_ranks records it as the rank's
    error); hooks must not touch the GPU."""
    _ABORT_HOOKS.append(fn)


_DOGS: dict = {}


def step_watchdog(group_name: str) -> "StepWatchdog":
    """The process's one watchdog of `group_name` (every plan of the group shares its thread)."""
    if group_name not in _DOGS:
        _DOGS[group_name] = StepWatchdog(group_name)
    return _DOGS[group_name]


class StepWatchdog:
    """Watches the CUDA steps of one comm group from a daemon thread.

    `mark()` (the runtime calls it after issuing a step) records an event on the current stream.
    The thread polls the oldest unfinished event; one older than TBO_COMM_TIMEOUT_S means the GPU
    is stuck in the step's collectives: it writes `tbo watchdog: <PeerFailure line>` to stderr,
    runs the abort hooks and ends the process with exit status 1.

    Its queries can land while the main thread captures a CUDA graph: a capture begun in the
    default global mode is then invalidated, so captures in a process with a watchdog use
    `capture_error_mode="thread_local"` (GraphedProgram does; so must an engine's own)."""

    def __init__(self, group_name: str, poll_s: float = 0.05):
        import collections
        import threading

        self.group_name, self.poll_s = group_name, poll_s
        self.pending: collections.deque = collections.deque()
        self._thread = threading.Thread(target=self._run, name=f"tbo-watchdog-{group_name}", daemon=True)
        self._thread.start()

    def mark(self, what: str = "step") -> None:
        ev = torch.cuda.Event()
        ev.record()
        self.pending.append((ev, time.monotonic(), what))

    @staticmethod
    def _done(ev) -> bool:
        try:
            return ev.query()
        except Exception:  # noqa: BLE001 - a context broken by the failure: the step never finishes
            return False

    def _expired(self):
        """(seconds, what) of the oldest step still running past the timeout, else None."""
        while self.pending and self._done(self.pending[0][0]):
            self.pending.popleft()
        if not self.pending:
            return None
        _, since, what = self.pending[0]
        elapsed = time.monotonic() - since
        return (elapsed, what) if elapsed > comm_timeout_s() else None

    def _run(self) -> None:
        import os
        import sys

        while True:
            time.sleep(self.poll_s)
            try:
                late = self._expired()
            except Exception as e:  # noqa: BLE001 - a broken context: the main thread will see it too
                log.debug("watchdog poll failed: %s", one_line(e))
                continue
            if late is None:
                continue
            from tbo_compiler.runtime.comm import _GROUPS

            err = peer_failure(_GROUPS.get(self.group_name), late[1], late[0], comm_timeout_s(),
                               "the GPU is still inside the step's collectives (NCCL's watchdog does not "
                               "watch a replayed CUDA graph); ending this process")
            msg = f"tbo watchdog: {err}"
            for hook in list(_ABORT_HOOKS):
                try:
                    hook(str(err))
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
            os._exit(1)
            return  # only where os._exit is replaced (tests)
