"""Config validation and expansion: grids, sweeps, task subsets, orders, hashes; every error names file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mergelab.errors import MergelabError
from mergelab.experiment import load_config, parse_config
from tests.experiment.tiny import TASKS, Zoos


def parse(raw: dict[str, Any], tmp_path: Path) -> Any:
    return parse_config(raw, path=tmp_path / "exp.yaml", suite_tasks=Zoos(tmp_path).tasks)


def test_grid_is_a_cartesian_product_and_params_lists_stay_literal(tmp_path: Path) -> None:
    cfg = parse({"suites": ["tiny"], "methods": [
        {"method": "ties", "grid": {"density": [0.1, 0.2, 0.5], "scaling": [0.5, 1.0]}},
        {"method": "weight_average", "params": {"weights": [0.1, 0.2, 0.3, 0.4]}},
    ]}, tmp_path)
    ties = [r for r in cfg.runs if r.method == "ties"]
    assert len(ties) == 6  # 3 x 2
    assert {(r.params["density"], r.params["scaling"]) for r in ties} == {
        (d, s) for d in (0.1, 0.2, 0.5) for s in (0.5, 1.0)}
    assert "ties density=0.1 scaling=0.5" in {r.label for r in ties}
    (wa,) = [r for r in cfg.runs if r.method == "weight_average"]
    assert wa.params == {"weights": [0.1, 0.2, 0.3, 0.4]} and wa.label == "weight_average"
    assert cfg.db == tmp_path / "exp.sqlite"


def test_sweep_varies_one_hyperparameter_at_a_time(tmp_path: Path) -> None:
    cfg = parse({"suites": ["tiny"], "methods": [
        {"method": "ties", "label": "T", "params": {"density": 0.2},
         "sweep": {"scaling": [0.5, 1.0], "merge_func": ["sum"]}}]}, tmp_path)
    assert [r.params for r in cfg.runs] == [
        {"density": 0.2, "scaling": 0.5}, {"density": 0.2, "scaling": 1.0}, {"density": 0.2, "merge_func": "sum"}]
    assert [r.swept for r in cfg.runs] == [("scaling",), ("scaling",), ("merge_func",)]
    assert {r.group for r in cfg.runs} == {"T"}


def test_task_subsets(tmp_path: Path) -> None:
    def subsets(spec: Any) -> list[list[str]]:
        cfg = parse({"suites": ["tiny"], "tasks": [spec], "methods": ["task_arithmetic"]}, tmp_path)
        return [r.tasks for r in cfg.runs]

    assert subsets("all") == [TASKS]
    assert subsets(["beta", "alpha"]) == [["beta", "alpha"]]
    assert subsets({"leave_one_out": True}) == [[t for t in TASKS if t != held] for held in TASKS]
    assert len(subsets({"size": 2})) == 6  # C(4, 2)
    first = subsets({"random": {"size": 2, "count": 3, "seed": 7}})
    assert first == subsets({"random": {"size": 2, "count": 3, "seed": 7}})  # seeded: same subsets every time
    assert all(len(s) == 2 and set(s) <= set(TASKS) for s in first)


def test_domain_generalization_holds_out_each_task(tmp_path: Path) -> None:
    cfg = parse({"kind": "domain_generalization", "suites": ["tiny"], "methods": ["task_arithmetic"]}, tmp_path)
    assert [(r.tasks, r.eval_tasks) for r in cfg.runs] == [([t for t in TASKS if t != h], [h]) for h in TASKS]


def test_continual_orders(tmp_path: Path) -> None:
    cfg = parse({"kind": "continual", "suites": ["tiny"], "methods": [{"method": "opcm", "params": {"alpha": 0.5}}],
                 "orders": ["identity", {"random": 2, "seed": 1}]}, tmp_path)
    assert cfg.runs[0].tasks == TASKS
    assert all(sorted(r.tasks) == sorted(TASKS) for r in cfg.runs)
    assert [r.subset for r in cfg.runs][0] == "identity"


def test_hash_depends_on_resolved_hyperparameters_not_spelling(tmp_path: Path) -> None:
    def run_hash(params: dict[str, Any]) -> str:
        cfg = parse({"suites": ["tiny"], "methods": [{"method": "ties", "params": params}]}, tmp_path)
        return cfg.runs[0].hash

    assert run_hash({"scaling": 1}) == run_hash({"scaling": 1.0}) == run_hash({})  # 1.0 is the default
    assert run_hash({"scaling": 0.5}) != run_hash({})


def test_options_added_later_keep_stored_runs_at_their_earlier_value(tmp_path: Path) -> None:
    # a run stored before `keep` (cart) / `low_rank` (tsv, opcm) existed had no such key in its hash: at the
    # value that behaves as before (the method's `compat`) the key is left out, so the stored run is found
    import hashlib

    from mergelab.experiment.config import canonical_json

    def spec(raw: dict[str, Any]) -> Any:
        return parse({"suites": ["tiny"], **raw}, tmp_path).runs[0]

    def earlier_hash(run: Any, dropped: set[str]) -> str:  # the key as computed before the option existed
        key = {**run.key(), "hparams": {k: v for k, v in run.resolved.items() if k not in dropped}}
        return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:16]

    cart = spec({"methods": ["cart"]})
    assert "keep" not in cart.resolved and cart.used["keep"] == "top"  # the merge still gets the value
    assert spec({"methods": [{"method": "cart", "params": {"keep": "top"}}]}).hash == cart.hash
    assert spec({"methods": [{"method": "cart", "params": {"keep": "bottom"}}]}).hash != cart.hash
    official = spec({"methods": [{"method": "tsv", "params": {"low_rank": "official"}}]})
    assert official.hash == earlier_hash(official, {"low_rank", "rank_tol"})
    assert spec({"methods": ["tsv"]}).resolved["low_rank"] == "auto"  # the default is not the earlier value
    opcm = spec({"kind": "continual", "methods": [{"method": "opcm", "params": {"low_rank": "official"}}]})
    assert set(opcm.resolved) == {"alpha", "seed", "projection", "non_matrix", "exclude"}
    woven = spec({"methods": [{"method": "weave", "params": {"inner": "tsv", "low_rank": "official"}}]})
    assert woven.hash == earlier_hash(woven, {"low_rank", "rank_tol"})  # weave takes its inner method's compat
    sqrt = spec({"kind": "continual", "methods": [{"method": "opcm", "params": {"lambda_t": "sqrt"}}]})
    assert sqrt.resolved["lambda_t"] == "sqrt"


def test_compat_values_are_declared_hyperparameters() -> None:
    from mergelab.continual.rules import all_rules
    from mergelab.methods.registry import all_methods

    for thing in [*all_methods().values(), *all_rules().values()]:
        assert set(thing.compat) <= set(thing.defaults), thing.name


def test_routing_runs_each_task_with_its_route_and_refuses_one_given(tmp_path: Path) -> None:
    cfg = parse({"kind": "routing", "suites": ["tiny"], "methods": [{"method": "cart", "sweep": {"rank_ratio": [0.1, 1.0]}}]},
                tmp_path)
    assert [(r.eval_tasks, r.params["route"], r.subset) for r in cfg.runs if r.params["rank_ratio"] == 0.1] == \
        [([t], i, f"route={t}") for i, t in enumerate(TASKS)]
    assert len(cfg.runs) == 2 * len(TASKS) and all(r.tasks == TASKS for r in cfg.runs)
    with pytest.raises(MergelabError, match="route is set by kind 'routing'"):
        parse({"kind": "routing", "suites": ["tiny"], "methods": [{"method": "cart", "params": {"route": 0}}]}, tmp_path)
    with pytest.raises(MergelabError, match="route"):  # a method without a route
        parse({"kind": "routing", "suites": ["tiny"], "methods": ["ties"]}, tmp_path)


def test_same_run_under_two_labels_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MergelabError, match=r"methods: 'a' and 'b' are the same run"):
        parse({"suites": ["tiny"], "methods": [{"method": "ties", "label": "a"},
                                               {"method": "ties", "label": "b", "params": {"scaling": 1.0}}]},
              tmp_path)


@pytest.mark.parametrize(("raw", "key", "message"), [
    ({"suites": ["tiny"], "methods": ["nope"]}, "methods[0]", "unknown method 'nope'"),
    ({"suites": ["tiny"], "methods": [{"method": "ties", "params": {"densty": 0.2}}]}, "methods[0]",
     "no hyperparameter 'densty'"),
    ({"suites": ["tiny"], "methods": [{"method": "ties", "grid": {"density": ["x"]}}]}, "methods[0]",
     "should be a float"),
    ({"suites": ["tiny"], "methods": [{"method": "ties", "grid": {"density": 0.2}}]}, "methods[0].grid.density",
     "non-empty list"),
    ({"suites": ["tiny"], "methods": [{"method": "ties", "params": {"merge_func": "median"}}]}, "methods[0]",
     "is not one of"),
    ({"suites": ["nosuch"], "methods": ["ties"]}, "suites[0]", "unknown suite 'nosuch'"),
    ({"suites": ["tiny"], "tasks": [["alpha", "omega"]], "methods": ["ties"]}, "tasks[0]", "unknown task 'omega'"),
    ({"suites": ["tiny"], "tasks": [{"random": {"size": 9}}], "methods": ["ties"]}, "tasks[0].random.size",
     "integer in"),
    ({"suites": ["tiny"], "methods": ["ties"], "typo": 1}, "typo", "unknown key"),
    ({"kind": "magic", "suites": ["tiny"], "methods": ["ties"]}, "kind", "not one of"),
    ({"kind": "continual", "suites": ["tiny"], "methods": ["ties"]}, "methods[0]", "unknown continual method"),
    ({"kind": "continual", "suites": ["tiny"], "methods": ["swa"], "orders": [["alpha"]]}, "orders[0]",
     "every task once"),
    ({"suites": ["tiny"]}, "methods", "non-empty list"),
    ({"suites": ["tiny"], "methods": ["ties"], "eval": {"device": "tpu"}}, "eval.device", "not cpu, cuda"),
])
def test_validation_errors_name_file_and_key(tmp_path: Path, raw: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(MergelabError) as info:
        parse(raw, tmp_path)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'exp.yaml'}: {key}: "), text
    assert message in text and "\n" not in text


def test_load_config_reads_yaml_and_reports_bad_yaml(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("name: g\ndb: out/g.sqlite\nsuites: [tiny]\nmethods: [task_arithmetic]\n")
    cfg = load_config(good, suite_tasks=Zoos(tmp_path).tasks)
    assert cfg.name == "g" and cfg.db == tmp_path / "out" / "g.sqlite" and len(cfg.runs) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("suites: [tiny\n")
    with pytest.raises(MergelabError, match=r"bad\.yaml: not valid YAML \(line"):
        load_config(bad, suite_tasks=Zoos(tmp_path).tasks)
    with pytest.raises(MergelabError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
