"""The benchmark runs end to end on a small tensor and reports the targets."""

from __future__ import annotations

from feddistill.bench.codec import format_codec_table, run_codec_bench


def test_bench_rows_and_table() -> None:
    rows = run_codec_bench(numel=200_000, keeps=(0.01, 0.5), bits=(4, 1), repeats=1)

    assert len(rows) == 4
    for row in rows:
        for key in ("keep", "bits", "ratio", "time_ratio", "payload_bytes", "encode_s"):
            assert key in row
        assert row["ratio"] > 1 and row["time_ratio"] > 0 and row["max_abs_error"] >= 0
    target = next(r for r in rows if r["keep"] == 0.01 and r["bits"] == 4)
    assert target["kept"] == 2000
    table = format_codec_table(rows)
    assert "size target" in table and "time target" in table
    assert "not measured" in format_codec_table(rows[1:2])


def test_block_rows_are_labelled_and_not_taken_for_the_target() -> None:
    rows = run_codec_bench(numel=80_000, keeps=(0.01,), bits=(4,), repeats=1, block=8)

    (row,) = rows
    assert row["block"] == 8 and row["kept"] == 800
    table = format_codec_table(rows)
    assert table.startswith("selection: top-k of runs of 8 elements")
    assert "not measured" in table  # the targets are stated for per-element selection
