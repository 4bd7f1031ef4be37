"""Firmware versions compare part by part; a part that only looks like a number (a superscript
digit passes str.isdigit but not int()) compares as text instead of raising."""
from ca.policy import version_key


def test_numbers_compare_as_numbers():
    assert version_key("2.10.0") > version_key("2.9.1")


def test_a_digit_that_int_cannot_read_is_text_not_a_crash():
    assert "³".isdigit()
    assert version_key("1.³") == ((0, 1, ""), (1, 0, "³"))
    assert version_key("1.³") > version_key("1.9")   # text parts sort after numbers
