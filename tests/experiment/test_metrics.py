"""ACC and BWT (OPCM Eq. 16) on hand-made accuracy matrices."""

from __future__ import annotations

import pytest

from mergelab.experiment.metrics import acc, bwt, step_averages

# rows: after step 1, 2, 3; columns: task 1, 2, 3 (None: not merged yet)
MATRIX = [[0.90, None, None],
          [0.80, 0.70, None],
          [0.60, 0.65, 0.50]]


def test_acc_is_the_final_rows_mean() -> None:
    assert acc(MATRIX) == pytest.approx((0.60 + 0.65 + 0.50) / 3)


def test_bwt_is_final_minus_just_merged_over_the_first_t_minus_1_tasks() -> None:
    # task 1: 0.60 - 0.90 = -0.30; task 2: 0.65 - 0.70 = -0.05; the last task does not count
    assert bwt(MATRIX) == pytest.approx((-0.30 - 0.05) / 2)


def test_bwt_positive_when_later_merges_help_and_zero_for_one_task() -> None:
    assert bwt([[0.5, None], [0.7, 0.9]]) == pytest.approx(0.2)
    assert bwt([[0.8]]) == 0.0


def test_step_averages_use_only_merged_tasks() -> None:
    assert step_averages(MATRIX) == pytest.approx([0.90, 0.75, (0.60 + 0.65 + 0.50) / 3])


def test_incomplete_matrix_is_refused() -> None:
    with pytest.raises(ValueError):
        acc([[0.9, None]])
    with pytest.raises(ValueError):
        bwt([[None, None], [0.5, 0.5]])
