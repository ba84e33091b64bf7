"""Smoke test of bench_data (4 small JPEGs, one pass): every decoder and source yields a finite row, and the
command line prints the table. A wiring test, not a timing test; run by `make bench-cpu`.

It uses pytest-benchmark's fixture so that `--benchmark-only` does not skip it.
"""
import json
import math

from benchmarks.bench_data import main, run, to_markdown


def test_every_pipeline_produces_a_row(benchmark, tmp_path, capsys):
    rows = benchmark.pedantic(run, kwargs=dict(images=4, height=60, width=80, size=32, repeat=1), rounds=1,
                              iterations=1)
    got = {(r.source, r.pipeline) for r in rows}
    expected = {("folder", "float, pil (original)"), ("device", "normalise + flip (on this CPU)")}
    expected |= {(source, f"uint8, {d}") for source in ("folder", "shards") for d in ("pil", "turbojpeg")}
    assert got == expected
    assert all(math.isfinite(r.ms_per_image) and r.ms_per_image > 0 for r in rows)
    assert to_markdown(rows).count("\n") == len(rows) + 1
    assert main(["--images", "2", "--repeat", "1", "--size", "16", "--json", str(tmp_path / "rows.json")]) == 0
    assert "uint8, turbojpeg" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "rows.json").read_text())["rows"]) == len(rows)
