"""PiSSA: A, B from the top-r SVD of W0, the base replaced by the residual; merge gives W0 back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import assert_trees_close
from jlora.kinds import pissa
from jlora.core.adapter import table
from tiny import GPT2_LINEAR, LLAMA_LINEAR, TOKENS, hf_model, jax_model, peft_module, torch_logits

LINEAR = {"gpt2": GPT2_LINEAR, "llama": LLAMA_LINEAR}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    return (request.param, *jax_model(request.param))


def principal_part(w, r):
    """The top-r part U_r·S_r·V_rᵀ of w and its singular values, in float64."""
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    return (u[..., :, :r] * s[..., None, :r]) @ vt[..., :r, :], s


@pytest.mark.parametrize(
    "alpha, use_rslora, scaling", [(None, False, 1.0), (6.0, False, 2.0), (6.0, True, 6.0 / 3**0.5)]
)
def test_factors_are_the_principal_singular_part(alpha, use_rslora, scaling):
    w = np.random.default_rng(0).normal(size=(12, 8))
    params = {"proj": {"kernel": jnp.asarray(w, jnp.float32)}}
    residual, adapters = pissa.init(params, rank=3, alpha=alpha, use_rslora=use_rslora, targets=["proj"])
    lora = adapters["proj"]["kernel"]
    assert isinstance(lora, jlora.LoRA) and lora.scaling == pytest.approx(scaling)
    a, b = np.asarray(lora.a, np.float64), np.asarray(lora.b, np.float64)
    top, s = principal_part(w, 3)
    np.testing.assert_allclose(scaling * a @ b, top, atol=1e-5)
    # A = U_r·√(S_r/scaling), B = √(S_r/scaling)·V_rᵀ: orthogonal columns / rows of those lengths.
    np.testing.assert_allclose(a.T @ a, np.diag(s[:3] / scaling), atol=1e-5)
    np.testing.assert_allclose(b @ b.T, np.diag(s[:3] / scaling), atol=1e-5)
    np.testing.assert_allclose(residual["proj"]["kernel"], w - top, atol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(residual["proj"]["kernel"], compute_uv=False)[:5], s[3:], atol=1e-5)
    np.testing.assert_allclose(jlora.merge(residual, adapters)["proj"]["kernel"], w, atol=1e-5)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_stacked_and_multi_axis_weights_take_one_svd_per_layer_of_the_flattened_matrix():
    rng = np.random.default_rng(1)
    stacked, general = rng.normal(size=(3, 10, 6)), rng.normal(size=(10, 2, 4))  # (L, in, out), (in, heads, dim)
    params = {"stacked": jnp.asarray(stacked, jnp.float32), "general": jnp.asarray(general, jnp.float32)}
    residual, adapters = pissa.init(params, rank=2, targets=r"stacked|general", stack_axes={"stacked": 1})
    s, g = adapters["stacked"], adapters["general"]
    assert (s.a.shape, s.b.shape, g.a.shape, g.b.shape) == ((3, 10, 2), (3, 2, 6), (10, 2), (2, 2, 4))
    np.testing.assert_allclose(np.matmul(s.a, s.b), principal_part(stacked, 2)[0], atol=1e-5)
    np.testing.assert_allclose(g.delta().reshape(10, 8), principal_part(general.reshape(10, 8), 2)[0], atol=1e-5)
    assert_trees_close(jlora.merge(residual, adapters), params, tol=1e-6)


@pytest.mark.slow  # heavy compile: kept out of the fast tier
def test_residual_plus_adapters_is_the_base_model(tiny):
    kind, model, params, tokens = tiny
    residual, adapters = pissa.init(params, rank=4, targets=LINEAR[kind])
    assert_trees_close(jlora.merge(residual, adapters), params, tol=1e-6)
    untouched = [p for p, _ in jlora.paths.leaves(params) if p not in table(adapters)]
    flat_residual = dict(jlora.paths.leaves(residual))
    assert all(flat_residual[p] is w for p, w in jlora.paths.leaves(params) if p in untouched)
    # The adapters are plain LoRA: same count as jlora.init, and the model is unchanged at the start.
    lora = jlora.init(params, 4, targets=LINEAR[kind])
    assert jlora.count_params(residual, adapters) == jlora.count_params(params, lora)
    logits = jax.jit(jlora.adapt(model.apply, strict=True))(residual, adapters, tokens)
    assert_trees_close(logits, jax.jit(model.apply)(params, tokens), tol=1e-5)


def test_random_init_options_are_refused():
    params = {"proj": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(TypeError, match=r"takes no 'key': PiSSA's factors come from the SVD"):
        pissa.init(params, rank=2, targets=["proj"], key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"rank 5 for 'proj/kernel'"):
        pissa.init(params, rank=5, targets=["proj"])


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_pissa_init_of_the_same_weights_gives_the_same_split(tmp_path, kind):
    peft = pytest.importorskip("peft")
    fresh, model, variables = hf_model(kind, tmp_path)
    residual, adapters = pissa.init(variables, rank=4, alpha=8, targets=LINEAR[kind])
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR[kind], init_lora_weights="pissa",
                             fan_in_fan_out=kind == "gpt2")
    theirs = peft.get_peft_model(fresh(), config).eval()
    ours_residual = dict(jlora.paths.leaves(residual))
    for path, lora in table(adapters).items():
        layer = peft_module(theirs, path)
        their_a = layer.lora_A["default"].weight.detach().numpy()
        their_b = layer.lora_B["default"].weight.detach().numpy()
        # Singular vectors have a sign each, so compare A·B (PEFT: lora_A [r, in] = A.T, lora_B [out, r] = B.T).
        np.testing.assert_allclose(np.asarray(lora.a @ lora.b), their_a.T @ their_b.T, atol=1e-4)
        base = layer.base_layer.weight.detach().numpy()  # Conv1D: (in, out); Linear: (out, in)
        np.testing.assert_allclose(ours_residual[path], base if kind == "gpt2" else base.T, atol=1e-4)
    expected = torch_logits(theirs)
    ours = np.asarray(jlora.adapt(model.apply)(residual, adapters, jnp.array(TOKENS)))
    assert np.abs(ours - expected).max() < 1e-4
