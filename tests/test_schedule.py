"""The run's schedule against the obvious expansion: a phase per iteration, written out."""

from hypothesis import given
from hypothesis import strategies as st

from nitrofusion.training.schedule import Schedule


@given(st.integers(0, 5), st.lists(st.integers(0, 4), min_size=1, max_size=4))
def test_schedule_is_the_iterations_written_out(pretrain, stages):
    written = [("pretrain", 1)] * pretrain + [("distill", k + 1) for k, n in enumerate(stages) for _ in range(n)]
    s = Schedule(pretrain, stages, "adversarial")
    assert s.total == len(written)
    assert [(s.phase(i).name, s.phase(i).num_steps) for i in range(s.total)] == written
    # A phase starts wherever the written-out list changes, and its label says which one it is.
    starts = [i for i in range(len(written)) if i == 0 or written[i] != written[i - 1]]
    assert [start for start, _ in s.labels()] == starts
    assert all(s.phase(start).start == start for start in starts)
    names = [name for _, name in s.labels()]
    assert all(("pre-training (adversarial)" == n) == (written[i][0] == "pretrain") for i, n in zip(starts, names))
    # Each refinement stage ends where the next phase starts (or the run ends).
    ends = {
        i + 1: k
        for i, (name, k) in enumerate(written)
        if name == "distill" and (written[i + 1 :] or [None])[0] != (name, k)
    }
    assert s.stage_ends() == ends
    assert s.max_sampling_steps() == max([k for name, k in written if name == "distill"], default=1)


def test_labels_name_the_step_counts():
    s = Schedule(2, [3, 0, 1], "regression")
    assert s.labels() == [(0, "pre-training (regression)"), (2, "1 step"), (5, "3 steps")]
    assert s.stage_ends() == {5: 1, 6: 3} and s.total == 6
