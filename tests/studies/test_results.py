"""The studies' shared results bits: CSV bytes, mean ± std, the runs sentence of a summary."""

from __future__ import annotations

import pytest

from lifelong_delta.studies.results import csv_bytes, mean_std, runs_sentence


def test_csv_bytes_are_a_header_and_quoted_cells_with_unix_line_ends() -> None:
    rows = [["ft", 0, "0.500000"], ["a,b", 1, 'say "hi"'], []]
    assert csv_bytes(("method", "seed", "acc"), rows) == b'method,seed,acc\nft,0,0.500000\n"a,b",1,"say ""hi"""\n\n'
    assert csv_bytes(("a",), iter([])) == b"a\n"


def test_mean_std_is_the_sample_std_and_zero_for_one_value() -> None:
    assert mean_std([0.2, 0.4]) == pytest.approx((0.3, 0.1414213562))
    assert mean_std([0.7]) == (0.7, 0.0)


def test_runs_sentence() -> None:
    assert runs_sentence(3, 6, 90.0, "make cl-eval") == (
        "this call trained 3 of 6 runs in 1.5 min (finished runs are reused). Reproduce: `make cl-eval`."
    )
