"""The Landscape page on a hand-made store: heat map cells, failed cells, links to runs."""

import json
from pathlib import Path

import pyarrow as pa
from streamlit.testing.v1 import AppTest

from _runs import write_run

REPO = Path(__file__).resolve().parents[1]
PAGE = "app_pages/landscape.py"


def _landscape(root: Path, monkeypatch) -> AppTest:
    """The page as the app's navigation runs it (its links name other pages)."""
    monkeypatch.setenv("DPSTUDY_RUNS", str(root))
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
    at.switch_page(PAGE).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _store(root: Path) -> None:
    cells = [("dp_sgd", "sgd", 1.0, lr, dice, status) for lr, dice, status in
             [(0.1, 0.61, "completed"), (1.0, 0.70, "completed"), (10.0, None, "failed")]]
    cells += [("auto_clip", "sgd", 1.0, lr, dice, "completed") for lr, dice in
              [(0.1, 0.66), (1.0, 0.65)]]
    for i, (method, opt, c, lr, dice, status) in enumerate(cells):
        path = write_run(root, f"run-{i}", status=status) / "config.json"
        meta = json.loads(path.read_text())
        meta["config"].update(method=method, optimizer=opt, max_grad_norm=c, lr=lr,
                              target_epsilon=3.0)
        if status == "failed":
            meta["error"] = "Diverged: training diverged in epoch 1: the training loss is nan"
        path.write_text(json.dumps(meta))
        if dice is None:
            (path.parent / "history.csv").unlink()
        else:
            (path.parent / "history.csv").write_text(f"epoch,val_dice_fg_mean\n1,{dice}\n")


def _drawn(at: AppTest):
    """The rows of the page's heat map (its Arrow dataset)."""
    (dataset,) = at.get("vega_lite_chart")[0].proto.datasets
    return pa.ipc.open_stream(dataset.data.data).read_all().to_pandas().to_dict("records")


def test_the_landscape_draws_every_cell_and_marks_the_diverged_one(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    _store(root)
    at = _landscape(root, monkeypatch)
    cells = {(r["method"], r["lr"]): r for r in _drawn(at)}
    assert len(cells) == 5
    assert cells[("dp_sgd", 10.0)]["state"] == "diverged"
    assert cells[("dp_sgd", 1.0)]["text"] == "0.700"
    best = at.dataframe[0].value.set_index("method")
    assert best.loc["DP-SGD", "loss one step off"] == "0.700"     # the diverged neighbour
    assert best.loc["Automatic Clipping", "learning rate"] == "0.1"
    labels = at.selectbox(key="landscape_cell").options
    assert any("DP-SGD · sgd · C = 1 · lr 10 (diverged)" == label for label in labels)


def test_without_a_learning_rate_grid_the_page_says_what_it_needs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    write_run(root, "only-one")
    at = _landscape(root, monkeypatch)
    assert "--profile landscape" in at.info[0].value
