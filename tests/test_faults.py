"""A rank that dies, raises or hangs mid-step; ranks with uneven (one empty) batches.

EP=2 over real gloo. A step of a tiny plan breaks on rank 1 right after its dispatch started
(tests/fault_ranks.py). Rank 0 must fail on its own, with one line naming rank 1, within
TBO_COMM_TIMEOUT_S; `spawn_ranks` reports every rank and ends them all: never a hang.
"""
from __future__ import annotations

import re
import time

import pytest

import fault_ranks as fr
from tbo_compiler.models.tiny import make_tiny
from tbo_compiler.ops.errors import RuntimeFailure
from tbo_compiler.runtime.launch import run_ranks, spawn_ranks


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    d = make_tiny("qwen3_moe", root / "qwen3_moe", seed=1, num_experts=8)
    return str(d), str(fr.compile_plan(d, root / "plan.pt"))


def _first_line(text: str) -> str:
    return text.splitlines()[0]


def _seconds(msg: str) -> float:
    return float(re.search(r"failed after ([0-9.]+) s", msg).group(1))


CASES = {  # fault: (TBO_COMM_TIMEOUT_S, how rank 0 names rank 1, rank 1's status, rank 1's exit code)
    "raise": (20, "peer rank 1 failed (RuntimeError: injected fault: this rank's own code raised mid-step)",
              "error", 1),
    "kill": (20, "peer rank 1 dropped out (died or exited)", "died", -9),
    "hang": (3, "peer rank 1 did not answer within TBO_COMM_TIMEOUT_S=3 (hung or died)", "killed", -9),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(CASES))
def test_a_failing_rank_is_named_by_its_peer(plan, fault, tmp_path):
    timeout_s, named, status1, code1 = CASES[fault]
    log = tmp_path / "steps.log"
    t0 = time.monotonic()
    r0, r1 = spawn_ranks(fr.rank_steps, 2, *plan, fault, {"log_path": str(log)}, timeout=60, grace=2,
                         env={"TBO_COMM_TIMEOUT_S": str(timeout_s)})
    took = time.monotonic() - t0
    assert took < 45, took
    # the steps before the fault ran on both ranks, the faulty one did not finish
    done = log.read_text().split("\n")
    assert {"rank 0 step 1", "rank 1 step 1"} <= set(done) and "rank 1 step 2" not in done
    # rank 0: one line naming rank 1, its own collective, and why
    assert r0.status == "error" and r0.exitcode == 1, r0
    line = _first_line(r0.value)
    assert re.match(r"rank 0: comm group 'ep' collective '\w+' failed after [0-9.]+ s: ", line), line
    assert named in line, line
    if fault == "hang":  # bounded by the configured timeout, not gloo's 30 minutes
        assert 2.5 <= _seconds(line) <= 6, line
        assert "still running" in r1.value and "after rank 0 failed); killed" in r1.value, r1
    else:  # a peer that is gone is noticed at once, not after the timeout
        assert _seconds(line) < 10, line
    assert r1.status == status1 and r1.exitcode == code1, r1
    if fault == "raise":
        assert _first_line(r1.value) == "rank 1: RuntimeError: injected fault: this rank's own code raised mid-step"
    if fault == "kill":
        assert _first_line(r1.value).startswith("rank 1: killed by SIGKILL after"), r1


@pytest.mark.slow
def test_run_ranks_raises_every_ranks_error():
    """Rank 0 raises before the step's agreement: run_ranks raises one error with both ranks',
    rank 1's naming rank 0 and quoting its error (rank 0 announced it in the store)."""
    with pytest.raises(RuntimeFailure) as e:
        run_ranks(fr.rank_fails_before_agreeing, 2, 0, timeout=60, grace=2)
    first, *rest = re.findall(r"^rank \d+: .*$", str(e.value), re.M)
    assert first == "rank 0: RuntimeError: injected fault: this rank's own code raised mid-step"
    assert rest[0].startswith("rank 1: comm group 'ep' collective 'agree_num_tokens' failed after"), rest
    assert "peer rank 0 failed (RuntimeError: injected fault" in rest[0], rest


@pytest.mark.slow
def test_ranks_with_one_empty_batch_agree(plan):
    """One rank with no tokens: both ranks run the same bucket, program and cut on inputs padded
    to the same shapes, through a plan (policy auto) and through torch.compile (where the ranks
    see different token counts and so both run unsplit)."""
    counts = [[7, 0], [0, 3]]
    res = run_ranks(fr.rank_agree, 2, *plan, counts, timeout=120)
    for policy in ("auto", "tbo"):
        p0, p1 = res[0]["plan"][policy], res[1]["plan"][policy]
        for step, (s0, s1) in enumerate(zip(p0, p1)):
            same = {k: s0[k] for k in ("bucket", "variant", "by", "cut", "inputs")}
            assert same == {k: s1[k] for k in same}, (policy, step, s0, s1)
        assert [s["bucket"] for s in p0] == [10, 4]
        assert [s["inputs"][0] for s in p0] == [[10], [4]]  # input_ids padded to the bucket
        assert [s["out"][0] for s in p0] == [7, 0] and [s["out"][0] for s in p1] == [0, 3]
    assert {s["by"] for s in res[0]["plan"]["auto"]} == {"predicted"}
    assert all(s["variant"] == "tbo" and s["cut"] > 0 for s in res[0]["plan"]["tbo"])
    c0, c1 = res[0]["compiled"], res[1]["compiled"]
    assert len(c0) == len(c1) == 1 and c0[0]["cut"] == c1[0]["cut"] == 0, (c0, c1)
    assert c0[0]["fallback"], c0  # rank 0 cannot split its a2a's fixed split sizes (as in test_any_model)
    assert "ranks disagree on the split (rank 0: T=7 cut=0, rank 1: T=0 cut=0)" in c1[0]["fallback"], c1
    assert res[0]["diff"] <= 1e-5 and res[0]["shape"] == [7, 16] and res[1]["shape"] == [0, 16]


def test_peer_failure_names_only_ranks_it_can_know():
    """Two ranks: the peer is the other one. More: every rank that could be at fault, none
    claimed (no rank announced a failure here: no process group, no store)."""
    from tbo_compiler.runtime.comm import CommGroup
    from tbo_compiler.runtime.comm.faults import peer_failure

    gone = "[/src/gloo/transport/tcp/pair.cc:537] Connection reset by peer. This is typically caused by X"
    two = peer_failure(CommGroup("ep", 2, 1), "collective 'combine'", 0.2, 30, RuntimeError(gone))
    assert str(two) == ("rank 1: comm group 'ep' collective 'combine' failed after 0.2 s: peer rank 0 dropped out "
                        "(died or exited): Connection reset by peer.")
    four = peer_failure(CommGroup("tp", 4, 2), "collective 'all_gather'", 30.0, 30, "Timed out waiting 30000ms")
    assert str(four).startswith("rank 2: comm group 'tp' collective 'all_gather' failed after 30.0 s: one of peer "
                                "ranks 0, 1, 3 did not answer within TBO_COMM_TIMEOUT_S=30 (hung or died)")


@pytest.mark.parametrize("raw", ["soon", "0", "-1"])
def test_bad_comm_timeout_is_one_line(monkeypatch, raw):
    from tbo_compiler.runtime.env import comm_timeout_s

    monkeypatch.setenv("TBO_COMM_TIMEOUT_S", raw)
    with pytest.raises(RuntimeFailure, match="TBO_COMM_TIMEOUT_S"):
        comm_timeout_s()


def test_device_wait_is_bounded(monkeypatch):
    """The NCCL-side wait (agree_num_tokens on a device group, comm.synchronize) polls an event:
    one that never completes (a kernel spinning for a dead peer) ends at the timeout, naming the
    peer. A fake event stands in for the GPU."""
    from tbo_compiler.runtime.comm import CommGroup, faults

    class Spinning:
        def record(self):
            pass

        def query(self):
            return False

    monkeypatch.setattr(faults.torch.cuda, "Event", Spinning)
    t0 = time.monotonic()
    with pytest.raises(faults.PeerFailure) as e:
        faults.wait_device(CommGroup("ep", 2, 0), "collective 'agree_num_tokens'", t0, 0.3)
    assert 0.3 <= time.monotonic() - t0 < 2
    assert str(e.value).startswith("rank 0: comm group 'ep' collective 'agree_num_tokens' failed after 0.3 s: "
                                   "peer rank 1 did not answer within TBO_COMM_TIMEOUT_S=0.3 (hung or died)")


def test_step_watchdog_ends_a_process_stuck_behind_a_dead_peer(monkeypatch):
    """A step whose device work never finishes (a replayed graph's collective spinning for a dead
    peer; the host blocked in any CUDA call behind it) ends the process from the watchdog thread:
    abort hooks first, then one line naming the peer, then exit status 1. Steps that finish in time
    are forgotten. Fake events stand in for the GPU; os._exit is caught."""
    import os
    import threading

    from tbo_compiler.runtime import comm
    from tbo_compiler.runtime.comm import CommGroup, faults

    class Event:
        done = True

        def record(self):
            self.finished = Event.done

        def query(self):
            return self.finished

    exited, said = threading.Event(), []
    monkeypatch.setattr(faults.torch.cuda, "Event", Event)
    monkeypatch.setenv("TBO_COMM_TIMEOUT_S", "0.3")
    monkeypatch.setitem(comm._GROUPS, "wd", CommGroup("wd", 2, 0))
    monkeypatch.setattr(faults, "_ABORT_HOOKS", [said.append])
    monkeypatch.setattr(os, "_exit", lambda code: (said.append(code), exited.set()))
    dog = faults.StepWatchdog("wd", poll_s=0.02)
    dog.mark("step (bucket 8, tbo)")           # finishes: forgotten
    time.sleep(0.5)
    assert not exited.is_set() and not dog.pending
    Event.done = False
    t0 = time.monotonic()
    dog.mark("step (bucket 8, tbo)")           # never finishes
    assert exited.wait(5)
    assert 0.3 <= time.monotonic() - t0 < 2
    msg, code = said
    assert code == 1 and msg.startswith("rank 0: comm group 'wd' step (bucket 8, tbo) failed after 0.3 s: "
                                        "peer rank 1 did not answer within TBO_COMM_TIMEOUT_S=0.3")


def test_a_rank_dying_while_compiling_is_named():
    """The torch.compile path's one agreement per graph is bounded and names the peer too."""
    outcomes = spawn_ranks(fr.rank_dies_while_compiling, 2, timeout=120, env={"TBO_COMM_TIMEOUT_S": "20"})
    r0 = outcomes[0]
    assert r0.status == "error", r0
    assert "peer rank 1" in r0.value and "compile agreement" in r0.value, r0.value
