"""Every fuzz harness (fuzz/targets/) for a few hundred inputs: the seed corpus in the repo, the
random mutation engine of fuzz/run.py, and hypothesis' binary strategy. The long runs are
`python fuzz/run.py` (see fuzz/README.md); this keeps the harnesses and the corpus working."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.run import CORPUS_DIR, Mutator, corpus_of, load_harness
from fuzz.targets import TARGETS

RANDOM_INPUTS = 200
HYPOTHESIS_EXAMPLES = 40


@pytest.fixture(scope="module", params=TARGETS)
def harness(request: pytest.FixtureRequest) -> Iterator[object]:
    h = load_harness(request.param)
    yield h
    close = getattr(h, "close", None)
    if close is not None:
        close()


def test_corpus_in_repo_runs_clean(harness: object) -> None:
    seeds = corpus_of(harness)
    assert (CORPUS_DIR / harness.name).is_dir(), "run: python fuzz/run.py --write-seeds"  # type: ignore[attr-defined]
    assert seeds
    for data in seeds:
        harness.run(data)  # type: ignore[attr-defined]


def test_random_mutations_run_clean(harness: object) -> None:
    rng = random.Random(1234)
    mut = Mutator(rng, harness.dictionary)  # type: ignore[attr-defined]
    corpus = corpus_of(harness)
    for i in range(RANDOM_INPUTS):
        data = mut.fresh() if i % 10 == 0 else mut.mutate(rng.choice(corpus), rng.choice(corpus))
        harness.run(data)  # type: ignore[attr-defined]


def test_hypothesis_inputs_run_clean(harness: object) -> None:
    @settings(
        max_examples=HYPOTHESIS_EXAMPLES,
        database=None,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(max_size=2048))
    def prop(data: bytes) -> None:
        harness.run(data)  # type: ignore[attr-defined]

    prop()
