"""The shared benchmark writers: CSV columns and markdown tables."""

from __future__ import annotations

import csv

from moa_search.bench.report import markdown_table, write_csv


def test_write_csv_keeps_the_given_columns_in_order_and_drops_the_rest(tmp_path) -> None:
    rows = [{"b": 1, "a": 2, "extra": 3}, {"a": 4}]
    path = write_csv(rows, tmp_path / "x.csv", ["a", "b"])
    got = list(csv.reader(path.open()))
    assert got == [["a", "b"], ["2", "1"], ["4", ""]]


def test_write_csv_without_columns_takes_the_union_of_keys_in_first_seen_order(tmp_path) -> None:
    path = write_csv([{"b": 1}, {"a": 2, "b": 3}], tmp_path / "y.csv")
    assert list(csv.reader(path.open())) == [["b", "a"], ["1", ""], ["3", "2"]]


def test_markdown_table_blank_for_missing_cells_and_formats_with_cell() -> None:
    lines = markdown_table([{"a": 1.5}, {"b": "x"}], ["a", "b"], cell=lambda v: f"<{v}>")
    assert lines == ["| a | b |", "|---|---|", "| <1.5> | <> |", "| <> | <x> |"]
