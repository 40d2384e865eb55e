"""The seeded simulator (turnbuckle.testing.sim): no violations, determinism, and it bites.

Seeds: ``SIM_SEED=N`` replays one seed; ``SIM_SEEDS=K`` runs seeds 0..K-1 (default 30);
``TURNBUCKLE_SOAK=1`` runs 300 seeds of 2000 steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

import turnbuckle.adapters.sessions
import turnbuckle.sansio.execution
import turnbuckle.sansio.session
from turnbuckle.sansio.queue import check_completion, select_claim_prefix
from turnbuckle.testing.sim import FAULT_KINDS, SimulationReport, main, run_simulation

from ..figures import record as record_figures

SOAK = os.environ.get("TURNBUCKLE_SOAK") == "1"
STEPS = 2000 if SOAK else 400


def seeds() -> list[int]:
    if "SIM_SEED" in os.environ:
        return [int(os.environ["SIM_SEED"])]
    return list(range(int(os.environ.get("SIM_SEEDS", "300" if SOAK else "30"))))


def _revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def _failure(report: SimulationReport) -> str:
    return (
        f"simulation seed {report.seed} at revision {_revision()} broke an invariant\n"
        f"{report.format()}\n"
        f"replay: SIM_SEED={report.seed} pytest tests/sim  or  {report.replay_command()}"
    )


def test_sim_no_violations_and_every_fault_kind() -> None:
    faults: Counter[str] = Counter()
    for seed in seeds():
        report = run_simulation(seed, STEPS)
        assert not report.violations, _failure(report)
        faults.update(report.faults)
        assert report.acknowledged.get("commit", 0) + report.acknowledged.get("enqueue", 0) > 0
    if len(seeds()) >= 10:
        missing = [kind for kind in FAULT_KINDS if faults[kind] == 0]
        assert not missing, f"fault kinds never injected: {missing} ({dict(faults)})"
    record_figures(
        "Deterministic simulation: invariants hold under every fault kind",
        "the seeded pure-tier simulator (turnbuckle.testing.sim) drives session clients, task"
        " clients and execution workers against the memory store; the seed picks the"
        " interleaving and the fault plan; invariants are checked after every step",
        seeds=len(seeds()),
        steps_per_seed=STEPS,
        violations=0,
        **{f"faults_{kind}": faults[kind] for kind in FAULT_KINDS},
    )


def test_sim_same_seed_same_trace() -> None:
    first, second = run_simulation(7, 300), run_simulation(7, 300)
    assert first.trace_hash == second.trace_hash
    assert first.trace == second.trace
    assert first.faults == second.faults and first.acknowledged == second.acknowledged


def test_sim_different_seeds_differ() -> None:
    hashes = {run_simulation(seed, 200).trace_hash for seed in range(5)}
    assert len(hashes) == 5


def test_sim_replays_in_a_fresh_process() -> None:
    # PYTHONHASHSEED differs between processes: set iteration must not reach the trace.
    report = run_simulation(3, 200)
    code = (
        "from turnbuckle.testing.sim import run_simulation\n"
        "print(run_simulation(3, 200).trace_hash)"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        assert out.stdout.strip() == report.trace_hash


def _accept(*args: object, **kwargs: object) -> None:
    return None


@pytest.mark.parametrize(
    ("module", "name", "expect"),
    [
        (turnbuckle.adapters.sessions, "check_fence", "claim_work accepted a fence"),
        (turnbuckle.sansio.session, "check_fence", "commit accepted a fence"),
        (turnbuckle.sansio.session, "check_completion", "no longer owns"),
        (turnbuckle.sansio.execution, "check_handle", "accepted"),
    ],
    ids=["claim-fence", "commit-fence", "commit-claim", "execution-handle"],
)
def test_sim_bites_a_broken_decision(
    monkeypatch: pytest.MonkeyPatch, module: object, name: str, expect: str
) -> None:
    monkeypatch.setattr(module, name, _accept)
    found: list[str] = []
    for seed in range(20):
        found = list(run_simulation(seed, 400).violations)
        if found:
            break
    assert found, f"no seed caught {name} accepting anything"
    assert any(expect in v for v in found), found


def _select_skipping_every_claim(rows: Any, boundary: Any, max_batches: int, **kw: Any) -> Any:
    """The old claim rule: skip any live claim, whatever its grant and boundary."""
    now = kw["now_ms"]
    free = [r for r in rows if r.claim_token is None or r.claim_expires_at_ms <= now]
    return select_claim_prefix(free, boundary, max_batches, **kw)


def _completion_ignoring_the_grant(rows: Any, completion: Any, lease_fencing: int) -> None:
    grants = {r.claim_lease_fencing for r in rows if r is not None}
    check_completion(rows, completion, grants.pop() if len(grants) == 1 else lease_fencing)


@pytest.mark.parametrize(
    ("module", "name", "broken", "expect"),
    [
        (
            turnbuckle.adapters.sessions,
            "select_claim_prefix",
            _select_skipping_every_claim,
            "not the head",
        ),
        (
            turnbuckle.sansio.session,
            "check_completion",
            _completion_ignoring_the_grant,
            "older lease grant",
        ),
    ],
    ids=["claim-order", "commit-grant"],
)
def test_sim_bites_a_broken_order_rule(
    monkeypatch: pytest.MonkeyPatch, module: object, name: str, broken: Any, expect: str
) -> None:
    """Order across handovers is checked: the rule the runtime used to have (a claim skips
    work under any live claim) and a commit that ignores the claim's lease grant are caught."""
    monkeypatch.setattr(module, name, broken)
    found: list[str] = []
    for seed in range(20):
        found = [v for v in run_simulation(seed, 400).violations if expect in v]
        if found:
            break
    assert found, f"no seed caught the broken {name}"


def test_sim_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seed", "5", "--steps", "50", "--trace"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("0 ")
    assert f"trace_hash={run_simulation(5, 50).trace_hash}" in out
    assert "violations: 0" in out
