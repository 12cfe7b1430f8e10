"""The tuning landscape from a hand-made run table: cells, states, the good region."""

import numpy as np
import pandas as pd
import pytest

from dpstudy import plots
from dpstudy.landscape import best_cells, landscape_cells, landscape_chart


def _run(method, lr, dice, status="completed", error="", C=1.0, opt="sgd", seed=0, **kw):
    return {"run_id": f"{method}-{opt}-{C}-{lr}-{seed}-{kw}", "method": method, "optimizer": opt,
            "lr": lr, "max_grad_norm": C, "clip_fn": kw.get("clip_fn", "abadi"),
            "final_rate": kw.get("final_rate", 0.9), "gamma": 0.01, "status": status,
            "clipping": kw.get("clipping", "flat"),
            "error": error, "val_dice_fg_mean": dice, "seed": seed}


@pytest.fixture
def runs():
    return pd.DataFrame([
        _run("non_dp", 0.05, 0.8),                                   # not a landscape cell
        _run("dp_sgd", 0.1, 0.60), _run("dp_sgd", 1.0, 0.70), _run("dp_sgd", 1.0, 0.72, seed=1),
        _run("dp_sgd", 10.0, np.nan, "failed", "Diverged: training diverged in epoch 1"),
        _run("dp_sgd", 1.0, 0.50, C=0.1),
        _run("dp_sgd", 1.0, 0.90, clipping="per_layer"),            # a row of its own
        _run("auto_clip", 0.1, 0.65), _run("auto_clip", 1.0, 0.66),
        _run("auto_clip", 10.0, np.nan, "failed", "OSError: disk full"),
        _run("random_sparsification", None, 0.61, opt="adam", final_rate=0.5),
        _run("dp_sgd", 1.0, 0.3, status="running", C=10.0),          # unfinished: left out
    ])


def test_cells_average_seeds_and_keep_failures_as_marked_cells(runs):
    cells = landscape_cells(runs).set_index(["method", "setting", "lr"])
    assert len(cells) == 9
    assert cells.loc[("dp_sgd", "C = 1, per layer", 1.0), "val_dice_fg_mean"] == 0.9
    ok = cells.loc[("dp_sgd", "C = 1", 1.0)]
    assert ok["val_dice_fg_mean"] == pytest.approx(0.71) and ok["n_seeds"] == 2
    assert cells.loc[("dp_sgd", "C = 1", 10.0), "state"] == "diverged"
    assert cells.loc[("auto_clip", "γ = 0.01", 10.0), "state"] == "failed"
    # an unset learning rate is the method's default (RS with Adam: 2e-3)
    assert cells.loc[("random_sparsification", "r* = 0.5 (Abadi, C = 1)", 2e-3), "n_seeds"] == 1
    assert "C = 10" not in {s for _, s, _ in cells.index}


def test_best_cell_and_the_cost_of_one_learning_rate_step(runs):
    best = best_cells(landscape_cells(runs)).set_index(["method", "optimizer"])
    dp = best.loc[("dp_sgd", "sgd")]
    assert (dp["setting"], dp["lr"]) == ("C = 1, per layer", 1.0)     # alone on its row
    assert np.isnan(dp["loss_one_step_off"])
    flat = best_cells(landscape_cells(runs[runs["clipping"] == "flat"])).set_index(
        ["method", "optimizer"]).loc[("dp_sgd", "sgd")]
    # neighbours on its row: 0.60 at lr 0.1 and a divergence (counts 0) at lr 10
    assert (flat["setting"], flat["loss_one_step_off"]) == ("C = 1", pytest.approx(0.71))
    ac = best.loc[("auto_clip", "sgd")]
    assert ac["val_dice_fg_mean"] == 0.66 and ac["loss_one_step_off"] == pytest.approx(0.66)


def test_the_chart_draws_every_cell_with_its_label(runs):
    cells = landscape_cells(runs)
    chart = landscape_chart(cells)
    drawn = pd.read_csv(pd.io.common.BytesIO(plots.chart_to_csv(chart)))
    assert len(drawn) == len(cells)
    assert set(drawn["text"]) >= {"0.710", "diverged", "failed"}
    assert plots.chart_to_png(chart)[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_empty_store_gives_no_cells():
    assert landscape_cells(pd.DataFrame()).empty


def test_runs_that_differ_in_another_setting_get_rows_of_their_own(runs):
    """A cell never averages two configurations: the recipe and its adapters variant at
    the same learning rate are two rows, each the mean of its own seeds."""
    variant = pd.DataFrame([_run("auto_clip", 1.0, 0.60, seed=s, trainable="adapters")
                            for s in (0, 1)])
    both = pd.concat([runs.assign(trainable="all"),
                      variant.assign(trainable="adapters")], ignore_index=True)
    cells = landscape_cells(both).set_index(["method", "setting", "lr"])
    assert cells.loc[("auto_clip", "γ = 0.01, trainable all", 1.0), "val_dice_fg_mean"] == 0.66
    adapters = cells.loc[("auto_clip", "γ = 0.01, trainable adapters", 1.0)]
    assert adapters["val_dice_fg_mean"] == 0.60 and adapters["n_seeds"] == 2
    assert len(cells) == 10                        # the 9 of one setting, and the new one
    assert ("dp_sgd", "C = 1, trainable all", 1.0) in cells.index


def test_a_pretraining_implied_by_the_architecture_is_not_named_again(runs):
    """Architectures need their own pretraining: the width says it, not the run id."""
    def variant(width):
        return runs.assign(base_width=width, init_from=f"pre-{width}")
    rows = landscape_cells(pd.concat([variant(8), variant(16)], ignore_index=True))
    assert "C = 1, base width 16" in set(rows["setting"])
    assert not rows["setting"].str.contains("init from").any()
    two_starts = pd.concat([variant(8), variant(8).assign(init_from="other")], ignore_index=True)
    assert "C = 1, init from other" in set(landscape_cells(two_starts)["setting"])


def test_two_budgets_are_two_rows_named_by_epsilon_not_by_their_sigma(runs):
    at = {1.0: 7.0, 3.0: 2.7}
    both = pd.concat([runs.assign(target_epsilon=e, noise_multiplier=s) for e, s in at.items()],
                     ignore_index=True)
    settings = set(landscape_cells(both)["setting"])
    assert {"γ = 0.01, ε 1", "γ = 0.01, ε 3"} <= settings
    assert not any("σ" in s for s in settings)
