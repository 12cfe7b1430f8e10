"""The empirical-privacy blocks of a run's config.json (one-run canary audit, calibrated
membership attack) in the run table, the Overview, the Frontier and the report."""

import json

import pandas as pd
import pytest
from _runs import write_run
from streamlit.testing.v1 import AppTest
from test_app import FRONTIER, OVERVIEW, REPO, arrow, shown_table

from dpstudy import plots
from dpstudy.report import write_report
from dpstudy.store import RunStore


def one_run_audit(bound: float) -> dict:
    return {"variant": "white-box", "m": 1000, "n_included": 500, "guesses": 100,
            "correct": 62, "epsilon_lower_bound": bound, "confidence": 0.95, "delta": 1e-5}


def mia(gain: float) -> dict:
    return {"attack": "calibrated-loss", "auc": 0.5 + gain, "auc_ci": [0.45, 0.6],
            "reference_auc": 0.5, "auc_gain": gain, "auc_gain_ci": [-0.05, 0.1],
            "verdict": "no leakage detected by this attack"}


#: run id -> method, ε, the blocks its config.json has
RUNS = {"a-dp": ("dp_sgd", 2.0, {"one_run_audit": one_run_audit(0.4), "audit": mia(0.031)}),
        "b-auto": ("auto_clip", 8.0, {"one_run_audit": one_run_audit(1.25)}),
        "c-dp": ("dp_sgd", 4.0, {}),
        "d-non": ("non_dp", None, {"one_run_audit": one_run_audit(3.0), "audit": mia(0.2)})}


UNAUDITED = {k: (m, e, {}) for k, (m, e, _) in RUNS.items()}


def make_store(root, runs=RUNS):
    """Completed runs as the trainer leaves them, with the given audit blocks."""
    for run_id, (method, epsilon, blocks) in runs.items():
        path = write_run(root, run_id, **blocks) / "config.json"
        meta = json.loads(path.read_text())
        sigma = None if epsilon is None else 1.0
        meta["config"].update(method=method, noise_multiplier=sigma,
                              audit_canaries=blocks.get("one_run_audit", {}).get("m", 0))
        meta.update(epsilon=epsilon, noise_multiplier=sigma)
        path.write_text(json.dumps(meta))
    return root


@pytest.fixture
def app_on(monkeypatch):
    def make(root, page):
        monkeypatch.setenv("DPSTUDY_RUNS", str(root))
        at = AppTest.from_file(str(REPO / page), default_timeout=60).run()
        assert not at.exception, [e.value for e in at.exception]
        return at
    return make


def test_the_run_table_carries_the_bound_and_the_attack_gain(tmp_path):
    runs = RunStore(make_store(tmp_path)).list_runs().set_index("run_id")
    assert runs.loc["a-dp", "epsilon_lower_bound"] == 0.4
    assert runs.loc["a-dp", "audit_canaries"] == 1000
    assert runs.loc["a-dp", "mia_auc_gain"] == 0.031
    assert runs.loc["a-dp", "mia_verdict"] == "no leakage detected by this attack"
    assert runs.loc[["c-dp"], ["epsilon_lower_bound", "mia_auc_gain"]].isna().all(axis=None)


def test_overview_shows_the_bound_and_the_gain_next_to_epsilon(tmp_path, app_on):
    at = app_on(make_store(tmp_path), OVERVIEW)
    table = shown_table(at.dataframe[0]).set_index("run")
    columns = list(table.columns)
    after = columns[columns.index("B-scan-level ε") + 1:][:2]
    assert after == ["ε lower bound (audit, 95 %)", "MIA AUC gain"]
    assert table.loc["a-dp", after].tolist() == ["0.4", "+0.031"]
    assert table.loc["b-auto", after].tolist() == ["1.25", "–"]
    assert table.loc["c-dp", after].tolist() == ["–", "–"]
    assert table.loc["d-non", ["B-scan-level ε", *after]].tolist() == ["∞", "3", "+0.200"]
    assert any("B-scan-level" in c.value and "lower bound" in c.value for c in at.caption)
    at.toggle(key="all_columns").set_value(True).run()
    verdicts = shown_table(at.dataframe[0]).set_index("run")["membership audit verdict"]
    assert verdicts.to_dict() == {"a-dp": "no leakage detected by this attack", "b-auto": "–",
                                  "c-dp": "–", "d-non": "no leakage detected by this attack"}


def test_overview_leaves_the_audit_columns_out_until_a_run_has_one(tmp_path, app_on):
    at = app_on(make_store(tmp_path, UNAUDITED), OVERVIEW)
    at.toggle(key="all_columns").set_value(True).run()
    columns = set(shown_table(at.dataframe[0]).columns)
    assert "B-scan-level ε" in columns and not columns & {
        "ε lower bound (audit, 95 %)", "MIA AUC gain", "membership audit verdict"}


def empirical_chart(at: AppTest):
    return next((c for c in at.get("vega_lite_chart")
                 if "one-run canary audit" in c.proto.spec), None)


def test_frontier_draws_claimed_against_audited_epsilon_per_method(tmp_path, app_on):
    at = app_on(make_store(tmp_path), FRONTIER)
    chart = empirical_chart(at)
    (data, line) = sorted((arrow(s.data.data) for s in chart.proto.datasets),
                          key=lambda d: "run_id" not in d)  # the runs, the claimed-ε line
    data = data.set_index("run_id")
    assert set(data.index) == {"a-dp", "b-auto", "d-non"}  # c-dp was never audited
    assert data.loc["b-auto", ["epsilon", "epsilon_lower_bound"]].tolist() == [8.0, 1.25]
    assert (line["epsilon"] == line["epsilon_lower_bound"]).all()  # y = x, up to ε = 8 and over
    assert line["epsilon"].max() >= 8 and "claimed ε" in set(line["text"])
    spec = json.dumps(json.loads(chart.proto.spec), ensure_ascii=False)
    assert "B-scan-level ε (theoretical)" in spec
    assert json.dumps(plots.METHOD_SCALE.to_dict()["range"]) in spec
    assert any("canary audit" in c.value and "B-scan-level" in c.value for c in at.caption)


def test_frontier_without_audits_has_no_empirical_chart(tmp_path, app_on):
    at = app_on(make_store(tmp_path, UNAUDITED), FRONTIER)
    assert at.get("vega_lite_chart") and empirical_chart(at) is None


def test_the_report_draws_the_chart_only_for_audited_stores(tmp_path):
    out = tmp_path / "report"
    write_report(make_store(tmp_path / "runs"), out)
    table = pd.read_csv(out / "empirical_epsilon.csv").set_index("run_id")
    assert table["epsilon_lower_bound"].to_dict() == {"a-dp": 0.4, "b-auto": 1.25, "d-non": 3.0}
    assert "![empirical_epsilon](empirical_epsilon.png)" in (out / "report.md").read_text()
    write_report(make_store(tmp_path / "plain", UNAUDITED), tmp_path / "plain_report")
    assert not (tmp_path / "plain_report" / "empirical_epsilon.png").exists()
