import jax.numpy as jnp
import pytest
from flax import nnx

import pnjax
from pnjax.layers import layer_layout, layer_mask


def test_linen_layer_names(linen_params):
    assert pnjax.layer_names(linen_params) == ("Dense_0", "Dense_1")
    assert layer_layout(linen_params).leaf_layer == (0, 0, 1, 1)


def test_nested_and_root_layers():
    params = {"enc": {"Conv_0": {"kernel": jnp.ones(2), "bias": jnp.ones(1)}}, "w": jnp.ones(3)}
    assert pnjax.layer_names(params) == ("enc/Conv_0", "")
    assert pnjax.layer_names(jnp.ones(2)) == ("",)


def test_nnx_state_layer_names():
    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    assert pnjax.layer_names(state) == ("layers/0", "layers/1")


def test_layer_mask(linen_params):
    assert layer_mask(linen_params, None).tolist() == [1.0, 1.0]
    assert layer_mask(linen_params, "Dense_1").tolist() == [0.0, 1.0]
    assert layer_mask(linen_params, ["Dense_0"]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown layer name.*Dense_7.*Dense_0"):
        layer_mask(linen_params, ["Dense_7"])
    with pytest.raises(ValueError, match="selects no layer"):
        layer_mask(linen_params, [])
    with pytest.raises(ValueError, match="shape"):
        layer_mask(linen_params, jnp.ones(3))
