"""Property: every mutated example recipe is refused with the file and a line, fast, writing nothing."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekd.errors import RecipeError
from edgekd.recipe.load import load_recipe
from tests.recipe_mutations import EXAMPLES, MUTATIONS, mutate


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(example=st.sampled_from(EXAMPLES), kind=st.sampled_from(sorted(MUTATIONS)),
       seed=st.integers(0, 2**31 - 1))
def test_mutated_recipe_is_refused_with_file_and_line(tmp_path, example, kind, seed):
    path = tmp_path / "mutated.yaml"
    path.write_bytes(mutate(example, kind, seed))
    started = time.monotonic()
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert time.monotonic() - started < 5
    assert info.value.file == str(path)
    assert info.value.line is not None
    assert f"{path}:{info.value.line}" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mutated.yaml"]
