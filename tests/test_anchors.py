import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_like

import pnjax


def test_create_push_count(linen_params):
    bank = pnjax.AnchorBank.create(linen_params, capacity=3)
    assert int(bank.count) == 0 and bank.capacity == 3
    assert bank.names == ("Dense_0", "Dense_1")
    bank2 = bank.push(linen_params)
    assert int(bank.count) == 0, "push must be functional"
    assert int(bank2.count) == 1
    np.testing.assert_allclose(
        bank2.anchors["Dense_1"]["kernel"][0], linen_params["Dense_1"]["kernel"]
    )
    np.testing.assert_allclose(bank2.anchors["Dense_1"]["kernel"][1], 0.0)
    expect = [
        sum(float(jnp.sum(x**2)) for x in jax.tree_util.tree_leaves(linen_params[n]))
        for n in bank.names
    ]
    np.testing.assert_allclose(bank2.sq_norms[0], expect, rtol=1e-6)
    np.testing.assert_allclose(bank2.sq_norms[1:], 0.0)


def test_push_full_bank_raises(linen_params):
    bank = pnjax.AnchorBank.create(linen_params, capacity=1).push(linen_params)
    with pytest.raises(ValueError, match="full.*capacity=1"):
        bank.push(linen_params)


def test_push_under_jit_compiles_once(linen_params):
    traces = []

    @jax.jit
    def push(bank, p):
        traces.append(1)
        return bank.push(p)

    bank = pnjax.AnchorBank.create(linen_params, capacity=3)
    for _ in range(3):
        bank = push(bank, linen_params)
    assert int(bank.count) == 3 and len(traces) == 1
    full = push(bank, linen_params)  # traced: a full bank is left unchanged
    assert int(full.count) == 3


@pytest.mark.parametrize("capacity", [0, -1, 2.5, True, None])
def test_bad_capacity(linen_params, capacity):
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        pnjax.AnchorBank.create(linen_params, capacity=capacity)


def test_mismatched_structure_and_shapes(linen_params):
    bank = pnjax.AnchorBank.create(linen_params, capacity=2)
    with pytest.raises(ValueError, match="tree structure"):
        bank.push({"Dense_0": linen_params["Dense_0"]})
    bad = jax.tree_util.tree_map(lambda x: jnp.ones((*x.shape, 2)), linen_params)
    with pytest.raises(ValueError, match="leaf shapes"):
        bank.push(bad)


def test_empty_params():
    with pytest.raises(ValueError, match="no array leaves"):
        pnjax.AnchorBank.create({}, capacity=2)


def test_get_checks_the_slot(linen_params):
    bank = pnjax.AnchorBank.create(linen_params, capacity=3)
    with pytest.raises(IndexError, match="the bank is empty"):
        bank.get(0)
    a, b = random_like(linen_params, 1), random_like(linen_params, 2)
    bank = bank.push(a).push(b)
    chex.assert_trees_all_equal(bank.get(0), a)
    chex.assert_trees_all_equal(bank.get(-1), b)
    chex.assert_trees_all_equal(bank.get(-2), a)
    with pytest.raises(IndexError, match=r"slot 2 is empty \(count=2, capacity=3\)"):
        bank.get(2)
    with pytest.raises(IndexError, match="slot 5 is outside the bank"):
        bank.get(5)
    with pytest.raises(IndexError, match="slot -3 is outside"):
        bank.get(-3)


def test_stacked_bank_is_refused_with_a_fix(linen_params):
    bank = pnjax.AnchorBank.create(linen_params, capacity=2).push(linen_params)
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), bank)
    with pytest.raises(ValueError, match="index one chain first"):
        stacked.get(0)
    with pytest.raises(ValueError, match="inconsistent AnchorBank.*extra leading axis"):
        pnjax.persistent_penalty(linen_params, stacked, 0.1)


class PushVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_push_fills_slots_in_order(self):
        params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.arange(3.0)}}
        push = self.variant(lambda bank, p: bank.push(p))
        bank = pnjax.AnchorBank.create(params, capacity=2)
        bank = push(bank, params)
        bank = push(bank, jax.tree_util.tree_map(lambda x: 2 * x, params))
        assert int(bank.count) == 2
        chex.assert_trees_all_close(
            bank.anchors, jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), params)
        )
        chex.assert_trees_all_close(bank.sq_norms, jnp.array([[11.0], [44.0]]))
