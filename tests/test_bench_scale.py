"""``petmonai bench-scale`` end to end at tiny sizes: its files, and the Markdown's numbers are the JSON's."""

from __future__ import annotations

import json

import pytest

from petmonai.commands import main
from petmonai.studies.scale_report import COLUMNS, NOT_MEASURED, render_docs


@pytest.mark.slow
def test_bench_scale_end_to_end(tmp_path, fast_config, capsys):
    out, docs = tmp_path / "scale", tmp_path / "docs" / "scale.md"
    args = ["bench-scale", "--sizes", "6", "12", "--epochs", "1", "--torchrun-size", "4", "--output-dir", str(out),
            "--docs", str(docs)]
    for o in [*fast_config, "train.batch_size=2"]:
        args += ["--set", o]
    assert main(args) == 0
    results = json.loads((out / "scale.json").read_text())
    assert [r["n"] for r in results["rows"]] == [6, 12]
    assert (out / "scale.png").stat().st_size > 0 and not list(out.glob(".work-*"))  # work folder removed
    table = {}
    for line in (out / "scale.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = cells[1:]
    for key, heading in COLUMNS[1:]:
        cells = table[heading]
        for row, cell in zip(results["rows"], cells):
            assert float(cell) == pytest.approx(row[key], rel=1e-3), (heading, row["n"])
    for name, target in results["targets"].items():
        assert float(table[name][0]) == pytest.approx(target["value"], rel=1e-3)
        assert table[name][2] == ("yes" if target["ok"] else "NO")
    row = results["rows"][-1]
    assert row["on_disk"] and row["cache_bytes_per_scan"] > 0 and row["peak_rss_mb"] > 0
    assert results["torchrun"]["n"] == 4 and results["torchrun"]["split_s"] > 0
    page = docs.read_text()
    assert (docs.parent / "scale.png").is_file()
    assert NOT_MEASURED not in page and "10,000 scans" in page and (out / "scale.md").read_text().split("\n", 2)[2] in page
    assert "| figure | N=6 | N=12 |" in capsys.readouterr().out


def test_docs_page_without_results_states_no_figure():
    page = render_docs(None)
    assert NOT_MEASURED in page and "bench-scale" in page and "| N=" not in page and "(measured" not in page
