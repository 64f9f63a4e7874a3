import numpy as np
import pytest

from common import curriculum as cur


def test_parse_and_chunk_ranges_hand_computed():
    bounds = cur.parse_curriculum("50,100,150, 500")
    assert bounds == [50, 100, 150, 500]
    assert cur.chunk_ranges(bounds) == [(0, 50), (50, 100), (100, 150), (150, 500)]


@pytest.mark.parametrize("text, words", [
    ("", "comma-separated"), ("50,,100", "comma-separated"), ("0,50", "positive"), ("-5,10", "positive"),
    ("50,50", "strictly increasing"), ("100,50", "strictly increasing"), ("50,abc", "not an integer"),
    ("1.5", "not an integer"),
])
def test_parse_rejects(text, words):
    with pytest.raises(cur.CurriculumError, match=words):
        cur.parse_curriculum(text)


def test_dataset_size_and_selection():
    cur.check_against_dataset([50, 100], 100)
    with pytest.raises(cur.CurriculumError, match="only 99 rows"):
        cur.check_against_dataset([50, 100], 99)
    assert cur.select_chunks(10, None, None) == list(range(10))
    assert cur.select_chunks(10, 2, 5) == [2, 3, 4]
    for start, end in [(10, None), (-1, None), (3, 3), (3, 11)]:
        with pytest.raises(cur.CurriculumError):
            cur.select_chunks(10, start, end)
    assert cur.parse_chunk_list("7,4,4", 10, "--curriculum_checkpoints") == [4, 7]
    with pytest.raises(cur.CurriculumError, match="outside"):
        cur.parse_chunk_list("10", 10, "--curriculum_checkpoints")


def test_updates_per_epoch():
    assert cur.updates_per_epoch(50, 10, 1, 1) == 5
    assert cur.updates_per_epoch(50, 10, 1, 2) == 3
    assert cur.updates_per_epoch(23, 4, 2, 1) == 3
    assert cur.updates_per_epoch(450, 10, 1, 1) == 45


def test_batches_stay_inside_their_chunk_and_cover_it_once():
    bounds = [50, 73, 100]
    for chunk, (a, b) in enumerate(cur.chunk_ranges(bounds)):
        batches = list(cur.epoch_batches((a, b), 10, 1, 0, seed=3, chunk=chunk, epoch=0))
        rows = np.concatenate([bt.rows for bt in batches])
        assert sorted(rows.tolist()) == list(range(a, b))
        assert all(a <= bt.rows.min() and bt.rows.max() < b for bt in batches)
        sizes = [len(bt.rows) for bt in batches]
        assert sizes[:-1] == [10] * (len(sizes) - 1) and 0 < sizes[-1] <= 10
    assert [len(bt.rows) for bt in cur.epoch_batches((50, 73), 10, 1, 0, 3, 1, 0)] == [10, 10, 3]


def test_shuffle_is_seeded_and_shared_by_processes():
    def rows(*a):
        return [bt.rows.tolist() for bt in cur.epoch_batches(*a)]

    one = rows((0, 50), 10, 1, 0, 1, 0, 2)
    assert one == rows((0, 50), 10, 1, 0, 1, 0, 2) and one != rows((0, 50), 10, 1, 0, 1, 0, 3)
    # Two processes with batch 5 each see the same global batches as one process with batch 10,
    # and each knows where its rows start in the global batch.
    r0 = list(cur.epoch_batches((0, 50), 5, 2, 0, 1, 0, 2))
    r1 = list(cur.epoch_batches((0, 50), 5, 2, 1, 1, 0, 2))
    assert [a.rows.tolist() + b.rows.tolist() for a, b in zip(r0, r1)] == one
    assert [(a.offset, b.offset, a.global_size) for a, b in zip(r0, r1)] == [(0, 5, 10)] * 5
    # A short last global batch is split as evenly as possible.
    r0 = list(cur.epoch_batches((0, 23), 5, 2, 0, 1, 0, 0))
    r1 = list(cur.epoch_batches((0, 23), 5, 2, 1, 1, 0, 0))
    assert [len(a.rows) for a in r0] == [5, 5, 2] and [len(b.rows) for b in r1] == [5, 5, 1]
    assert [a.global_size for a in r0] == [10, 10, 3] and r1[-1].offset == 2
