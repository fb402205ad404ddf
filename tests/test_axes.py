"""jlora.core.axes: einsum words from axis ids, one-matmul contraction, reshape groups, where a weight's
axes land in a dot_general, and a per-axis scale applied without scaling the weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import normal
from jlora.core import axes


def test_letters_give_one_letter_per_id_and_fresh_ones_never_reused():
    letters = axes.Letters()
    assert letters.word((7, 3, 7)) == "aba"
    assert letters.fresh() == "c" and letters[3] == "b" and letters[9] == "d"


@pytest.mark.parametrize("lhs, rhs, out", [
    ("btd", "de", "bte"),  # a batched activation times a kernel: one 2-D matmul
    ("btd", "ed", "ebt"),  # output axes in another order
    ("hd", "dhe", "e"),  # two contracted axes
    ("btd", "bde", "bte"),  # a shared batch axis: einsum itself
])
def test_contract_equals_einsum(lhs, rhs, out):
    size = dict(b=2, t=3, d=4, e=5, h=6)
    x, w = normal(0, *[size[c] for c in lhs]), normal(1, *[size[c] for c in rhs])
    got = axes.contract(x, lhs, w, rhs, out)
    np.testing.assert_allclose(got, jnp.einsum(f"{lhs},{rhs}->{out}", x, w), rtol=1e-5, atol=1e-5)
    assert got.shape == tuple(size[c] for c in out)


@pytest.mark.parametrize("old, new, groups", [
    ((2, 3, 4), (6, 4), [([0, 1], [0]), ([2], [1])]),
    ((6, 4), (2, 3, 4), [([0], [0, 1]), ([1], [2])]),
    ((4, 1), (4,), [([0, 1], [0])]),  # a trailing unit axis joins the last group
    ((2, 3), (3, 2), [([0, 1], [0, 1])]),  # axes that mix are one group
    ((4,), (2, 3), None),  # not a reshape
])
def test_reshape_groups_pairs_runs_of_axes(old, new, groups):
    assert axes.reshape_groups(old, new) == groups


def test_dot_axes_follow_contracted_batched_and_free_axes():
    # x [b, t, d] . W [d, e]: x's d is the weight's axis 10; the result's e is axis 11.
    dims = (((2,), (0,)), ((), ()))
    assert axes.dot_axes((10, 11), 3, True, dims) == ([None, None, 10], [None, None, 11])
    # W [e, d] . x [d, t] (the weight on the left): the result is [e, t].
    dims = (((1,), (0,)), ((), ()))
    assert axes.dot_axes((11, 10), 2, False, dims) == ([10, None], [11, None])
    # A stacked weight [l, d, e] batched against x [l, t, d]: the stack axis leads the result.
    dims = (((2,), (1,)), ((0,), (0,)))
    assert axes.dot_axes((9, 10, 11), 3, True, dims) == ([9, None, 10], [9, None, 11])


def test_align_transposes_and_adds_unit_axes():
    values = normal(0, 3, 5)  # axes named 11, 10
    got = axes.align(values, (11, 10), [None, 10, 11])
    assert got.shape == (1, 5, 3)
    np.testing.assert_array_equal(got[0], values.T)


@pytest.mark.parametrize("scale_axis", [0, 1])  # the contracted axis, or the output axis
def test_scaled_dot_equals_the_dot_with_the_scaled_weight(scale_axis):
    x, w = normal(0, 2, 3, 4), normal(1, 4, 5)
    scale = normal(2, w.shape[scale_axis])
    params = dict(dimension_numbers=(((2,), (0,)), ((), ())), precision=None, preferred_element_type=None,
                  out_sharding=None)
    base_out = jax.lax.dot_general(x, w, params["dimension_numbers"])
    dot = lambda x, base_out: base_out
    got = axes.scaled_dot(scale, ((10, 11)[scale_axis],), (10, 11), w, x, True, base_out, params, dot)
    scaled = w * (scale[:, None] if scale_axis == 0 else scale[None, :])
    np.testing.assert_allclose(got, jnp.einsum("btd,de->bte", x, scaled), rtol=1e-5, atol=1e-5)


def test_scaled_dot_declines_a_scale_split_between_input_and_output_axes():
    x, w = normal(0, 2, 4), normal(1, 4, 5)
    params = dict(dimension_numbers=(((1,), (0,)), ((), ())))
    assert axes.scaled_dot(normal(2, 4, 5), (10, 11), (10, 11), w, x, True, x @ w, params, lambda *a: a[1]) is None
