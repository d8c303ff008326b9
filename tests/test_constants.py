from spinegrade.constants import (
    CONDITIONS,
    LABEL_COLUMNS,
    LEVELS,
    condition_title,
    flipped_condition,
    level_title,
    parse_row_id,
    row_id,
)


def test_row_id_round_trip_and_spellings():
    assert row_id(44036939, "spinal_canal_stenosis", "l1_l2") == "44036939_spinal_canal_stenosis_l1_l2"
    for c in CONDITIONS:
        for lv in LEVELS:
            assert parse_row_id(row_id(123, c, lv)) == (123, c, lv)
    assert condition_title("left_neural_foraminal_narrowing") == "Left Neural Foraminal Narrowing"
    assert level_title("l5_s1") == "L5/S1"
    assert len(LABEL_COLUMNS) == 25 and LABEL_COLUMNS[0] == "spinal_canal_stenosis_l1_l2"


def test_flip_swaps_sides_only():
    assert flipped_condition("left_subarticular_stenosis") == "right_subarticular_stenosis"
    assert flipped_condition("right_neural_foraminal_narrowing") == "left_neural_foraminal_narrowing"
    assert flipped_condition("spinal_canal_stenosis") == "spinal_canal_stenosis"
    for c in CONDITIONS:
        assert flipped_condition(flipped_condition(c)) == c
