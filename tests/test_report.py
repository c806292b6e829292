"""The one table formatter (mor.runtime.report): Markdown for results people paste, aligned text for terminals."""

from __future__ import annotations

import pytest

from mor.runtime.report import markdown_table, text_table


def test_markdown_table_pads_every_column_to_its_widest_cell():
    table = markdown_table(["task", "n"], [["arc", 1172], ["average", 5]])
    assert table.splitlines() == ["| task    | n    |", "| ------- | ---- |", "| arc     | 1172 |", "| average | 5    |"]


def test_markdown_table_without_rows_is_the_header_and_its_rule():
    assert markdown_table(["a", "bb"], []) == "| a | bb |\n| - | -- |"


def test_text_table_right_aligns_numbers_and_puts_the_title_on_top():
    lines = text_table(["method", "params", "ratio"], [["lora", "1,024", "1.000x"], ["mor", "512", "0.5x"]],
                       "Sizes").splitlines()
    assert lines[0] == "Sizes"
    assert lines[3] == "lora     1,024  1.000x"
    assert lines[4] == "mor        512    0.5x"


def test_a_row_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="row 1 has 1 cells but the header has 2"):
        markdown_table(["a", "b"], [["only one"]])
