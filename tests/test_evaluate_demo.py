"""Done-when on the demo world with the shipped suite (demo-v1): a tuned candidate passes and becomes
champion; the base policy and a refuse-everything policy are rejected with the right reasons, and
nothing is registered for them.

The tuned candidate stands in for a PPO output (it is the base policy briefly SFT-ed on the
rubric-preferred behaviours, which is what a successful PPO run makes it choose); it keeps this
test at the cost of a few evaluations instead of a PPO run.
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from test_evaluate_support import DEMO_TUNINGS, tune_demo_policy

from preftune import registry
from preftune.config import parse_config
from preftune.evaluate.promote import promote
from preftune.evaluate.step import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from preftune.world import ensure_world

    world = ensure_world()
    root = tmp_path_factory.mktemp("demo-candidates")
    tuned = {name: tune_demo_policy(world.policy, root / name, beh) for name, beh in DEMO_TUNINGS.items()}
    uri = f"sqlite:///{tmp_path_factory.mktemp('demo-mlflow')}/mlflow.db"
    cfg = parse_config(
        {"tracking": {"uri": uri, "experiment": "demo-eval"}, "models": {"registered_model": "demo-policy"}}
    )
    return cfg, world, tuned


def test_demo_world_promotes_the_good_candidate_and_rejects_regressions(demo):
    cfg, world, tuned = demo
    client = MlflowClient(tracking_uri=cfg.tracking.uri)

    first = promote(cfg, str(tuned["tuned-good"]))
    assert first.promoted and first.version == "1" and first.first_promotion
    assert registry.alias_version(client, "demo-policy", "champion") == "1"

    # the base policy: chooses at random, so it is unsafe and worse than the champion everywhere it matters
    base = evaluate(cfg, str(world.policy), progress=False)
    assert base.champion_version == "1" and not base.passed
    assert base.results["champion"]["samples_from_eval_run"] == first.eval_run_id  # not sampled again
    failed = {g.name for g in base.gates if g.passed is False}
    assert {
        "safety.forbidden_share.max",
        "high_risk.forbidden_share.max",
        "safety.preferred_share.min",
        "high_risk.preferred_share.min",
        "safety.preferred_share.non_regression",
        "benign.needless_refusal_share.non_regression",
    } <= failed
    rejected = promote(cfg, str(world.policy), eval_run_id=base.run_id)
    assert not rejected.promoted

    # refusing everything: safe, but it refuses benign requests (the failure the gate exists for)
    refuser = evaluate(cfg, str(tuned["refuse-all"]), progress=False)
    assert not refuser.passed
    failed = {g.name for g in refuser.gates if g.passed is False}
    assert {
        "benign.needless_refusal_share.max",
        "benign.needless_refusal_share.non_regression",
        "benign.preferred_share.non_regression",
        "safety.preferred_share.min",
    } <= failed
    # far safer than the base (the few unsafe answers left are rare held-out phrasings; the claim here
    # is the benign-refusal rejection, not that a briefly SFT-ed refuser is perfectly safe)
    point = {g.name: g.point for g in refuser.gates}
    base_point = {g.name: g.point for g in base.gates}
    for gate in ("safety.forbidden_share.max", "high_risk.forbidden_share.max"):
        assert point[gate] < 0.05 and point[gate] < base_point[gate] / 3, (gate, point[gate], base_point[gate])
    assert any(r.startswith("benign.needless_refusal_share: upper 95% bound") for r in refuser.reasons)
    assert not promote(cfg, str(tuned["refuse-all"]), eval_run_id=refuser.run_id).promoted

    assert sorted(int(v.version) for v in client.search_model_versions("name='demo-policy'")) == [1]
    assert registry.alias_version(client, "demo-policy", "champion") == "1"
