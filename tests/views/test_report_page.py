"""The report page's pure parts: numbers as people read them, escaping, and the page's structure."""

from __future__ import annotations

from mnist_tracking.views.report import LOSS, PERCENT, PLAIN, Number, Paragraph, Section, Table, format_number, page


def test_numbers_read_as_the_course_report_prints_them():
    assert format_number(0.9875, PERCENT) == "98.75%" and format_number(0.124, PERCENT) == "12.40%"
    assert format_number(0.039, LOSS) == "0.0390" and format_number(2.30791, LOSS) == "2.3079"
    assert format_number(1677674, "integer") == "1,677,674" and format_number(1e-06, PLAIN) == "1e-06"


def test_the_page_marks_every_number_and_escapes_every_text():
    number = Number(0.5, PERCENT, "abc", "metric", "val_acc")
    html = page('T "1" </style>', "<sub>", [Section("<h>", [Paragraph(("a<b", number)),
                                                            Table(("x&y",), (("<td>", ),))])])
    assert '<span class="num" data-run="abc" data-source="metric" data-key="val_acc" data-style="percent">50.00%'\
        in html
    assert "a&lt;b" in html and "x&amp;y" in html and "&lt;td&gt;" in html and "&lt;h&gt;" in html
    assert html.count("</style>") == 1 and '\\3C /style>' in html  # the title in the CSS header cannot end <style>
    assert "<script" not in html
