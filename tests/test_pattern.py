"""The layer-pattern grammar: expansion, whitespace, errors with their column, compression."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm.layouts.pattern import MAX_BLOCKS, MAX_DEPTH, PatternError, compress_symbols, expand_pattern

EXPANSIONS = {
    "M": ["M"],
    "M F A": ["M", "F", "A"],
    "M *3": ["M", "M", "M"],
    "(M F) *2": ["M", "F", "M", "F"],
    "((M F) *3 A F) *2": ["M", "F", "M", "F", "M", "F", "A", "F"] * 2,
    "M *2 *3": ["M"] * 6,
    "(M (A F) *2) *2 M": ["M", "A", "F", "A", "F"] * 2 + ["M"],
    "(M)": ["M"],
    "((M))": ["M"],
    "(M) *2 (F)": ["M", "M", "F"],
    "M *1": ["M"],
    "M *03": ["M"] * 3,
    "A (M F) *2 A": ["A", "M", "F", "M", "F", "A"],
    # multi-character symbols: identifiers, digits after the first character, underscores
    "Mamba_1 attn2 *2": ["Mamba_1", "attn2", "attn2"],
    "(_x9 Big) *2": ["_x9", "Big", "_x9", "Big"],
    "MF": ["MF"],
}


@pytest.mark.parametrize("pattern", list(EXPANSIONS))
def test_expansion(pattern):
    assert expand_pattern(pattern) == EXPANSIONS[pattern]


def test_nested_example_from_the_issue():
    got = expand_pattern("((M F) *3 A F) *2")
    assert len(got) == 16
    assert "".join(got) == "MFMFMFAF" * 2
    assert [i for i, s in enumerate(got) if s == "A"] == [6, 14]


@pytest.mark.parametrize("pattern", ["M*3", "M * 3", "M *3", "M* 3", "  M *3  ", "M\t*\t3", "M\n*\n3"])
def test_whitespace_variants_of_a_repeat(pattern):
    assert expand_pattern(pattern) == ["M", "M", "M"]


@pytest.mark.parametrize("pattern", ["(M F)*2", "( M F ) * 2", "(M\tF)\n*2", " (M F)  *  2 "])
def test_whitespace_variants_of_a_group(pattern):
    assert expand_pattern(pattern) == ["M", "F", "M", "F"]


def test_symbols_need_whitespace_between_them():
    assert expand_pattern("M F") == ["M", "F"]
    assert expand_pattern("MF") == ["MF"]  # one symbol, not two


# (pattern, message fragment, 1-based column or None)
ERRORS = {
    "open-unclosed": ("(M F", "unbalanced '('", 1),
    "inner-open-unclosed": ("M ((A F) *2", "unbalanced '('", 3),
    "close-unopened": ("M F)", "unbalanced ')'", 4),
    "close-after-group": ("(M F) *2)", "unbalanced ')'", 9),
    "zero-repeat": ("M *0", "at least 1, got 0", 4),
    "zero-repeat-nested": ("((M F) *0 A) *2", "at least 1, got 0", 9),
    "zero-repeat-padded": ("M *000", "got 0", 4),
    "empty-group": ("()", "empty group", 1),
    "empty-group-nested": ("M (F ())", "empty group", 6),
    "dangling-star": ("M *", "must be followed by a repeat count", 3),
    "star-then-symbol": ("M * F", "must be followed by a repeat count", 3),
    "double-star": ("M **2", "must be followed by a repeat count", 3),
    "leading-star": ("*3", "must follow a symbol or a group", 1),
    "star-after-open": ("M (*2 F)", "must follow a symbol or a group", 4),
    "bare-number": ("3", "unexpected number '3'", 1),
    "number-after-symbol": ("M 3", "unexpected number '3'", 3),
    "number-first-symbol": ("9M", "unexpected number '9'", 1),
    "bad-character": ("M $ F", "unexpected character '$'", 3),
    "dash": ("M-F", "unexpected character '-'", 2),
    "comma": ("M, F", "unexpected character ','", 2),
    "too-many": (f"M *{MAX_BLOCKS + 1}", f"more than {MAX_BLOCKS} blocks", 4),
    "too-many-nested": ("((M F) *1000) *1000", f"more than {MAX_BLOCKS} blocks", 16),
    "huge-count": ("M *99999999999999999999999", f"more than {MAX_BLOCKS} blocks", 4),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_name_their_column(case):
    pattern, fragment, column = ERRORS[case]
    with pytest.raises(PatternError) as info:
        expand_pattern(pattern)
    assert info.value.column == column
    assert fragment in str(info.value)
    assert f"(column {column})" in str(info.value)


@pytest.mark.parametrize("pattern", ["", "   ", "\t\n"])
def test_empty_pattern(pattern):
    with pytest.raises(PatternError, match="names no blocks"):
        expand_pattern(pattern)


def test_pattern_error_is_a_value_error():
    with pytest.raises(ValueError):
        expand_pattern("(")


def test_huge_sequence_of_items_is_refused():
    half = MAX_BLOCKS // 2 + 1
    with pytest.raises(PatternError, match=f"more than {MAX_BLOCKS}"):
        expand_pattern(f"(M *{half}) (F *{half})")


def test_exactly_max_blocks_is_allowed():
    assert len(expand_pattern(f"M *{MAX_BLOCKS}")) == MAX_BLOCKS


@pytest.mark.parametrize("depth", [5000])
def test_deep_nesting_is_a_pattern_error_not_a_crash(depth):
    """Nesting deep enough to exhaust Python's recursion must still be reported as a PatternError."""
    for pattern in ("(" * depth + "M" + ")" * depth, "(" * depth):
        with pytest.raises(PatternError, match="nested deeper") as info:
            expand_pattern(pattern)
        assert info.value.column == MAX_DEPTH + 1  # the first '(' past the limit


def test_nesting_up_to_the_limit_works():
    n = MAX_DEPTH
    assert expand_pattern("(" * n + "M" + ")" * n + " *2") == ["M", "M"]


ROUND_TRIP = [
    "M",
    "M F A",
    "((M F) *3 A F) *2",
    "(M F) *24",
    "((M F) *5 A F) *4",
    "M *7 (F A) *2 M",
    "A B A B A B C",
    "(M *3 A *3) *2",
    "M M F M M F M M F A",
    "(Mamba_1 attn2 *2) *3 x",
    "(M (A F) *2) *2 M",
]


@pytest.mark.parametrize("pattern", ROUND_TRIP)
def test_compress_re_expands_to_the_same_list(pattern):
    symbols = expand_pattern(pattern)
    compressed = compress_symbols(symbols)
    assert expand_pattern(compressed) == symbols


@pytest.mark.parametrize("symbols,want", [
    (["M", "F"] * 3 + ["A", "F"], "(M F) *3 A F"),
    (list("MFMFMFAF") * 2, "((M F) *3 A F) *2"),
    (["M"], "M"),
    (["M"] * 5, "M *5"),
    (["A", "B", "C"], "A B C"),
])
def test_compress_is_short(symbols, want):
    assert compress_symbols(symbols) == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["M", "F", "A", "x1"]), min_size=1, max_size=24))
def test_compress_round_trip_property(symbols):
    compressed = compress_symbols(symbols)
    assert expand_pattern(compressed) == symbols
