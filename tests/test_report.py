"""read_report: the report file or the folder holding it, and every malformed report refused in one line."""

from __future__ import annotations

import json

import pytest
from test_plot import make_report

from beft_trainer.errors import ReportError
from beft_trainer.report import REPORT_NAME, read_report, write_report


def write_edited_report(folder, edit) -> str:
    payload = make_report().to_dict()
    edit(payload)
    path = folder / REPORT_NAME
    path.write_text(json.dumps(payload))
    return str(path)


def refusal(path) -> str:
    with pytest.raises(ReportError) as error:
        read_report(path)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_read_report_takes_the_file_or_the_folder_holding_it(tmp_path):
    write_report(make_report(), str(tmp_path / REPORT_NAME))
    assert read_report(tmp_path) == read_report(tmp_path / REPORT_NAME) == make_report()


def test_unreadable_paths_are_one_line(tmp_path):
    assert refusal(tmp_path / "missing") == f"{tmp_path / 'missing'} does not exist."
    assert refusal(tmp_path).startswith(f"No {REPORT_NAME} in {tmp_path}: it is written by BiasSelectionCallback")
    (tmp_path / REPORT_NAME).write_text("{not json")
    assert "is not a BEFT selection report: Expecting property name" in refusal(tmp_path)
    (tmp_path / REPORT_NAME).write_text("[]")
    assert "it holds a JSON list, not an object" in refusal(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(extra=1), "not a BEFT selection report: unknown fields ['extra']"),
        (lambda r: r.pop("scores"), "not a BEFT selection report: it lacks the fields ['scores']"),
        (lambda r: r.update(selected=["zz"]), "'selected' names 'zz', which is not among the candidates ['q', 'k', 'v']"),
        (lambda r: r.update(inert={"zz": "why"}), "'inert' names 'zz', which is not among the candidates"),
        (lambda r: r.update(candidates="qkv"), "'candidates' must be a list of bias types"),
        (lambda r: r["scores"]["q"].update(magnitude="big"), "scores['q'] lacks a numeric 'magnitude' score"),
        (lambda r: r["scores"]["q"].update(parameters="many"), "scores['q']['parameters'] must be a number"),
        (lambda r: r["scores"]["q"]["per_layer"]["fisher"].update(x=1), "scores['q']['per_layer'] must map"),
    ],
    ids=["extra-field", "missing-field", "selected-not-a-candidate", "inert-not-a-candidate", "candidates-string",
         "score-string", "parameters-string", "per-layer-bad-layer"],
)  # fmt: skip
def test_malformed_reports_are_one_line(tmp_path, edit, message):
    assert message in refusal(write_edited_report(tmp_path, edit))
