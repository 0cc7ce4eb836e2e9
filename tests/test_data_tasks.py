"""Synthetic tasks: determinism, disjoint splits, answers that are actually right."""

import random

import pytest

from blockdiff.data.tasks import (
    TASKS,
    TaskExample,
    accuracy,
    example_split,
    generate_examples,
    is_correct,
    make_example,
)


def test_deterministic_for_split_n_seed():
    assert generate_examples("train", 200, seed=3) == generate_examples("train", 200, seed=3)
    assert generate_examples("train", 200, seed=3) != generate_examples("train", 200, seed=4)
    # A longer draw extends a shorter one, so growing n never reshuffles earlier examples.
    assert generate_examples("heldout", 80)[:40] == generate_examples("heldout", 40)


def test_round_robin_over_tasks():
    examples = generate_examples("train", 40)
    assert [e.task for e in examples] == [TASKS[i % 4] for i in range(40)]
    only = generate_examples("heldout", 10, tasks=("sort",))
    assert {e.task for e in only} == {"sort"}


def test_splits_are_disjoint_by_prompt():
    train = generate_examples("train", 4000, seed=1)
    heldout = generate_examples("heldout", 1000, seed=1)
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}
    assert all(example_split(e.prompt) == "train" for e in train)
    assert all(example_split(e.prompt) == "heldout" for e in heldout)


def _solve(prompt: str) -> str:
    """An independent solver written from the format, not from the generator."""
    task, _, body = prompt.partition(" ")
    if task == "add":
        a, b = body.rstrip("=").split("+")
        return str(int(a) + int(b))
    if task == "reverse":
        return "".join(reversed(body.rstrip("=")))
    if task == "sort":
        return " ".join(sorted(body.rstrip("=").split()))
    if task == "lookup":
        *pairs, query = body.split()
        table = dict(p.split("=") for p in pairs)
        assert len(table) == len(pairs), "keys must be distinct"
        return table[query.rstrip("?")]
    raise AssertionError(prompt)


def test_answers_are_correct_and_formats_hold():
    for e in generate_examples("train", 800, seed=7):
        assert e.prompt.isascii() and e.answer.isascii()
        assert e.prompt.endswith(("=", "?")) and e.answer.strip() == e.answer != ""
        assert e.text == e.prompt + e.answer
        assert _solve(e.prompt) == e.answer, e
        body = e.prompt.split(" ", 1)[1]
        if e.task == "add":
            assert all(1 <= len(x) <= 3 for x in body.rstrip("=").split("+"))
        elif e.task == "reverse":
            assert 3 <= len(e.answer) <= 8 and e.answer.islower()
        elif e.task == "sort":
            assert 3 <= len(e.answer.split()) <= 6
        else:
            assert 3 <= len(body.split()) - 1 <= 5


def test_make_example_and_bad_names():
    e = make_example("add", random.Random(0))
    assert e.task == "add" and e.prompt.startswith("add ")
    with pytest.raises(ValueError, match="add"):
        make_example("multiply", random.Random(0))
    with pytest.raises(ValueError, match="heldout"):
        generate_examples("test", 5)
    with pytest.raises(ValueError, match="lookup"):
        generate_examples("train", 5, tasks=("add", "nope"))


def test_is_correct_and_accuracy():
    e = TaskExample("add", "add 2+2=", "4")
    assert is_correct(e, "4") and is_correct(e, " 4\n")
    assert not is_correct(e, "44") and not is_correct(e, "") and not is_correct(e, "4 5")
    assert accuracy([e, e, e, e], ["4", "5", " 4", "x"]) == 0.5
    with pytest.raises(ValueError):
        accuracy([e], [])
