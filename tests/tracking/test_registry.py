"""Promotion rules on a real MLflow registry (SQLite): gates decide, force needs a reason, rollback walks back,
and every decision is an audit run."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from typer.testing import CliRunner

from adaptflow.errors import ConfigError
from adaptflow.flows.cli import app
from adaptflow.tracking.registry import CHALLENGER, CHAMPION, PromotionRefused, audit_trail, promote, rollback

MODEL = "adaptflow-test"


@pytest.fixture
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model(MODEL)
    (tmp_path / "model").mkdir()

    def add(gates: str, **gate_tags) -> str:
        tags = {"adaptflow.gates": gates} | {f"adaptflow.gate.{k}": v for k, v in gate_tags.items()}
        version = client.create_model_version(MODEL, str(tmp_path / "model"), tags=tags).version
        client.set_registered_model_alias(MODEL, CHALLENGER, version)
        return str(version)

    return client, add, uri


def champion(client) -> str:
    return str(client.get_model_version_by_alias(MODEL, CHAMPION).version)


def test_a_passing_challenger_becomes_champion_and_a_failing_one_does_not(registry):
    client, add, _ = registry
    first = add("passed", min_task_metric="pass: test macro_f1 0.45 ≥ 0.4")
    assert promote(client, MODEL, user="ci")["action"] == "promote" and champion(client) == first
    add("failed", min_task_metric="FAIL: test macro_f1 0.31 < 0.4", max_robustness_drop="pass: fine")
    with pytest.raises(PromotionRefused, match=r"gates failed: min_task_metric \(test macro_f1 0.31 < 0.4\)"):
        promote(client, MODEL, user="ci")
    assert champion(client) == first, "a gate failure leaves champion untouched"
    refused = audit_trail(client, MODEL)[-1]
    assert refused["action"] == "refused" and "0.31 < 0.4" in refused["reason"] and refused["previous"] == first
    better = add("passed")
    promote(client, MODEL, user="ci")
    assert champion(client) == better
    assert [e["action"] for e in audit_trail(client, MODEL)] == ["promote", "refused", "promote"]


def test_force_needs_a_reason_and_records_who_and_why(registry):
    client, add, _ = registry
    add("passed")
    promote(client, MODEL)
    failing = add("failed", min_task_metric="FAIL: 0.1 < 0.4")
    with pytest.raises(ConfigError, match="needs a reason"):
        promote(client, MODEL, force=True)
    record = promote(client, MODEL, force=True, reason="hotfix for a broken tokenizer", user="alice")
    assert champion(client) == failing
    last = audit_trail(client, MODEL)[-1]
    assert (last["forced"], last["by"], last["reason"]) == ("True", "alice", "hotfix for a broken tokenizer")
    assert record["gates"] == "failed"


def test_rollback_walks_back_the_promotions_and_stops_at_the_first(registry):
    client, add, _ = registry
    v1 = add("passed")
    promote(client, MODEL)
    v2 = add("passed")
    promote(client, MODEL)
    v3 = add("passed")
    promote(client, MODEL)
    assert rollback(client, MODEL, user="bob")["version"] == v2 and champion(client) == v2
    assert rollback(client, MODEL)["version"] == v1 and champion(client) == v1
    with pytest.raises(PromotionRefused, match="no earlier champion"):
        rollback(client, MODEL)
    assert champion(client) == v1 and v3 == "3"


def test_the_promote_command(registry):
    client, add, uri = registry
    add("passed")
    runner = CliRunner()
    done = runner.invoke(app, ["promote", MODEL, "--tracking-uri", uri])
    assert done.exit_code == 0, done.output
    assert "champion → version 1" in done.output
    add("failed", min_task_metric="FAIL: 0.2 < 0.4")
    refused = runner.invoke(app, ["promote", MODEL, "--tracking-uri", uri])
    assert refused.exit_code == 1 and "stays out of service" in refused.output and champion(client) == "1"
    forced = runner.invoke(app, ["promote", MODEL, "--tracking-uri", uri, "--force", "--reason", "accepted risk"])
    assert forced.exit_code == 0 and champion(client) == "2"
    back = runner.invoke(app, ["promote", MODEL, "--tracking-uri", uri, "--rollback"])
    assert back.exit_code == 0 and champion(client) == "1", back.output


@pytest.mark.usefixtures("prefect_server")
def test_the_promote_flow_applies_the_same_rules(registry):
    from adaptflow.flows.promote import promote as promote_flow

    client, add, uri = registry
    add("passed")
    assert promote_flow(MODEL, uri)["version"] == "1" and champion(client) == "1"
    add("failed", min_task_metric="FAIL: 0.2 < 0.4")
    with pytest.raises(PromotionRefused):
        promote_flow(MODEL, uri)
    assert champion(client) == "1" and audit_trail(client, MODEL)[-1]["by"] == "prefect"


def test_a_promotion_judged_against_a_champion_that_has_since_moved_is_refused(registry):
    client, add, _ = registry
    first = add("passed")
    second = add("passed")  # judged while there was no champion yet …
    promote(client, MODEL, version=first, user="other build", expected_champion=None)  # … which then moved
    with pytest.raises(PromotionRefused, match=rf"champion moved from unset to {first} after this decision"):
        promote(client, MODEL, version=second, user="ci", expected_champion=None)
    assert champion(client) == first
    refused = audit_trail(client, MODEL)[-1]
    assert (refused["action"], refused["version"], refused["previous"]) == ("refused", second, first)
    promote(client, MODEL, version=second, user="ci", expected_champion=first)  # judged against the right one
    assert champion(client) == second


def test_two_promotions_judged_against_the_same_champion_at_once_move_it_once(registry, monkeypatch):
    """Two builds decide at the same moment against "no champion": the re-read and the move hold one lock on a
    local store, so the second sees the first's move and is refused, however slow the move (widened here)."""
    import threading
    import time

    from adaptflow.tracking import registry as module

    client, add, uri = registry
    versions = [add("passed"), add("passed")]
    set_alias = module._set_alias

    def slow_set_alias(*args):
        time.sleep(0.5)  # a loaded machine: without the lock, both re-read "unset" before either moves
        return set_alias(*args)

    monkeypatch.setattr(module, "_set_alias", slow_set_alias)
    outcomes = {}

    def decide(version):
        try:
            outcomes[version] = promote(MlflowClient(uri), MODEL, version=version, expected_champion=None)["action"]
        except PromotionRefused as refused:
            outcomes[version] = str(refused)

    threads = [threading.Thread(target=decide, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    promoted = [v for v, outcome in outcomes.items() if outcome == "promote"]
    assert len(promoted) == 1, outcomes
    other = next(v for v in versions if v not in promoted)
    assert f"champion moved from unset to {promoted[0]}" in outcomes[other]
    assert champion(client) == promoted[0]


def test_a_version_no_gate_judged_is_not_promoted_unless_forced(registry):
    client, add, _ = registry
    add("none")
    with pytest.raises(PromotionRefused, match="no promotion gate judged it"):
        promote(client, MODEL, user="ci")
    assert audit_trail(client, MODEL)[-1]["action"] == "refused"
    with pytest.raises(MlflowException):
        champion(client)  # never set
    assert promote(client, MODEL, force=True, reason="reviewed by hand", user="ci")["action"] == "promote"
