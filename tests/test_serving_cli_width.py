"""The serving table reads at 80 columns: whole policy names, no cell cut (the TTFT's CI and
tokens/s are left out under 100 columns, and said so)."""
from click.testing import CliRunner

from simmoe.cli import main


def test_serving_table_fits_80_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = CliRunner().invoke(main, ["run", "scenarios/serving_olmoe_live.yaml", "-o", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output
    import json

    from rich.console import Console

    from simmoe.serve_cli import serving_table

    rows = json.loads((tmp_path / "o" / "summary.json").read_text())
    rows = rows["results"]
    for narrow, width in ((True, 80), (False, 120)):
        c = Console(width=width, record=True)
        c.print(serving_table(rows, "t", narrow))
        text = c.export_text()
        assert "…" not in text and all(len(ln) <= width for ln in text.splitlines())
        assert all(p in text for p in ("lru-bypass-defer", "lru-bypass", "lru-warm"))
        assert ("±" in text) is not narrow
