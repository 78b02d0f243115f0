"""plot_report: a readable PNG from a report object or its JSON file."""

from __future__ import annotations

import pytest

from beft_trainer.errors import ReportError
from beft_trainer.plot import plot_report
from beft_trainer.report import SelectionReport, write_report


def make_report(selected=("v",), inert=("k",), score="projection", layers=3) -> SelectionReport:
    """A hand-made report: v moved most, k inert, q in between."""
    strength = {"q": 0.5, "k": 1e-7, "v": 1.0}
    scores = {}
    for bias_type, s in strength.items():
        values = {"projection": 0.1 * s, "magnitude": 0.02 * s, "fisher": 1e-6 * s**3, "random": 0.3}
        per_layer = {name: {str(i): v * (1 + 0.1 * i) for i in range(layers)} for name, v in values.items()}
        scores[bias_type] = values | {"per_layer": per_layer}
    return SelectionReport(
        model_type="bert",
        candidates=list(strength),
        scores=scores,
        selected=list(selected),
        score=score,
        probe_steps=5,
        step=5,
        inert={t: "gradient is rounding noise" for t in inert},
        trainable_parameters={"before": 300, "after": 100, "total": 10_000},
    )


def test_plot_from_report_and_from_json(tmp_path):
    report = make_report()
    png = plot_report(report, tmp_path / "sub" / "plot.png")
    data = (tmp_path / "sub" / "plot.png").read_bytes()
    assert png.endswith("plot.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    write_report(report, str(tmp_path / "beft_selection.json"))
    plot_report(str(tmp_path / "beft_selection.json"), tmp_path / "from_json.png")
    assert (tmp_path / "from_json.png").stat().st_size > 20_000


def test_plot_marks_choice_and_inert(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = {}
    original = matplotlib.figure.Figure.savefig

    def capture(fig, *args, **kwargs):
        saved["fig"] = fig
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    plot_report(make_report(score="random"), tmp_path / "p.png")
    fig = saved["fig"]
    ax_types, ax_layers, ax_fisher = fig.axes
    labels = [t.get_text() for t in ax_types.get_xticklabels()]
    assert labels == ["q", "k\ninert", "v\nSELECTED"]
    assert ax_types.get_xticklabels()[2].get_fontweight() == "bold"
    legend = [t.get_text() for t in ax_types.get_legend().get_texts()]
    assert "random (decides)" in legend and "inert type" in legend
    # Each score is normalized to its largest value: the selected v peaks at 1 in every score.
    assert max(p.get_height() for p in ax_types.patches if hasattr(p, "get_height")) == pytest.approx(1.0)
    assert ax_fisher.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax_layers.get_lines()}
    assert set(lines) == {"q", "k (inert)", "v (selected)"}
    assert lines["v (selected)"].get_linewidth() > lines["q"].get_linewidth()
    assert "selected v by random" in fig._suptitle.get_text()


def test_plot_missing_report_is_an_error(tmp_path):
    with pytest.raises(ReportError, match="none.json does not exist"):
        plot_report(tmp_path / "none.json", tmp_path / "p.png")


def test_plot_refuses_a_png_path_onto_a_folder_or_through_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ReportError, match="notes.txt is a file, not a folder"):
        plot_report(make_report(), tmp_path / "notes.txt" / "sub" / "plot.png")
    with pytest.raises(ReportError, match="it is a folder; give the path of a .png file"):
        plot_report(make_report(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_plotting_leaves_the_users_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_report(make_report(), tmp_path / "plot.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


@pytest.mark.parametrize("name", ["plot.txt", "plot", "plot.png.pdf"])
def test_plot_path_must_end_in_png(tmp_path, name):
    with pytest.raises(ReportError, match=r"give a path ending in \.png"):
        plot_report(make_report(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_plot_returns_the_path_written(tmp_path):
    assert plot_report(make_report(), tmp_path / "Plot.PNG") == str(tmp_path / "Plot.PNG")
    assert [p.name for p in tmp_path.iterdir()] == ["Plot.PNG"]
