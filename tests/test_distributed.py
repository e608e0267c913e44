"""Keeping processes in step: shares padded to the longest, objects gathered (one process here)."""

from lit_mistral.distributed import gather_objects, in_step


def test_shares_are_padded_to_the_longest_with_the_filler():
    shares = [[0, 2, 4], [1, 3], []]
    assert in_step(shares, 0, "f") == [0, 2, 4]
    assert in_step(shares, 1, "f") == [1, 3, "f"]
    assert in_step(shares, 2, "f") == ["f", "f", "f"]


def test_gathering_on_one_process_is_the_object_itself():
    state = {"a": 1}
    assert gather_objects(state, 1) == [state]
