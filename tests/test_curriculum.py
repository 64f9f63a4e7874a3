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
        rows = np.concatenate([r for r, _ in batches])
        assert sorted(rows.tolist()) == list(range(a, b))
        assert all(a <= r.min() and r.max() < b for r, _ in batches)
        sizes = [len(r) for r, _ in batches]
        assert sizes[:-1] == [10] * (len(sizes) - 1) and 0 < sizes[-1] <= 10
    assert [len(r) for r, _ in cur.epoch_batches((50, 73), 10, 1, 0, 3, 1, 0)] == [10, 10, 3]


def test_shuffle_is_seeded_and_shared_by_processes():
    one = [r.tolist() for r, _ in cur.epoch_batches((0, 50), 10, 1, 0, seed=1, chunk=0, epoch=2)]
    again = [r.tolist() for r, _ in cur.epoch_batches((0, 50), 10, 1, 0, seed=1, chunk=0, epoch=2)]
    other_epoch = [r.tolist() for r, _ in cur.epoch_batches((0, 50), 10, 1, 0, seed=1, chunk=0, epoch=3)]
    assert one == again and one != other_epoch
    # Two processes with batch 5 each see the same global batches as one process with batch 10.
    r0 = list(cur.epoch_batches((0, 50), 5, 2, 0, seed=1, chunk=0, epoch=2))
    r1 = list(cur.epoch_batches((0, 50), 5, 2, 1, seed=1, chunk=0, epoch=2))
    assert [a.tolist() + b.tolist() for (a, _), (b, _) in zip(r0, r1)] == one
    assert all(n == 10 for _, n in r0)
    # A short last global batch is split as evenly as possible.
    r0 = list(cur.epoch_batches((0, 23), 5, 2, 0, 1, 0, 0))
    r1 = list(cur.epoch_batches((0, 23), 5, 2, 1, 1, 0, 0))
    assert [len(a) for a, _ in r0] == [5, 5, 2] and [len(b) for b, _ in r1] == [5, 5, 1]
    assert [n for _, n in r0] == [10, 10, 3]
