"""Every attention implementation equals the XLA reference, forward and gradients.

On CPU the Pallas kernels run their own code in interpret mode and cuDNN's call runs on XLA's
backend, so these tests check each kernel's masking, grouped-query mapping, scaling, backward
pass and sharding wrapper; only the compiled lowering is left to the accelerators.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lime_jax.model import attention, sharding

B, N, K, H = 4, 4, 2, 32
KERNELS = ("pallas_gpu", "splash")


def _segment_ids(L: int) -> np.ndarray:
    """Row 0 full of documents, rows 1-2 end in padding (0), row 3 is all padding."""
    ids = np.zeros((B, L), np.int32)
    a, b = L // 3, L // 2
    ids[0, :a], ids[0, a:b], ids[0, b:] = 1, 2, 3
    ids[1, :a], ids[1, a:b + 5] = 1, 2
    ids[2, :L - 7] = 1
    return ids


def _qkv(L: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    # q is pre-scaled by 1/sqrt(H) in the model; here too, so the softmax sees realistic logits.
    q = rng.normal(size=(B, L, N, H)) * H ** -0.5
    k, v = rng.normal(size=(B, L, K, H)), rng.normal(size=(B, L, K, H))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _loss_and_grads(fn, q, k, v):
    """A weighted sum of the outputs, so every position and feature gets its own cotangent."""
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _reference(segment_ids):
    return lambda q, k, v: attention.reference(q, k, v, attention.causal_segment_mask(segment_ids))


def _assert_close(got, want, atol):
    (out, grads), (out_ref, grads_ref) = got, want
    for name, x, y in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_ref, *grads_ref)):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert bool(jnp.all(jnp.isfinite(x))), f"{name} has NaN/inf"
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol, err_msg=name)


@pytest.mark.parametrize("impl", ("xla", *KERNELS))
def test_packed_matches_reference(impl):
    L = 256  # pallas_gpu: 2 forward blocks, 8 backward blocks per row; splash: one 256 block
    ids = jnp.asarray(_segment_ids(L))
    q, k, v = _qkv(L, jnp.float32)
    got = _loss_and_grads(lambda q, k, v: attention.packed(q, k, v, ids, impl), q, k, v)
    want = _loss_and_grads(_reference(ids), q, k, v)
    _assert_close(got, want, atol=2e-5)
    assert float(jnp.abs(want[1][0]).max()) > 0.5  # the grads are not small: 2e-5 is a tight bound


@pytest.mark.parametrize("impl", KERNELS)
def test_packed_bf16_as_accurate_as_reference(impl):
    """In bf16 the kernels round at other points than the reference: measured against the f32
    result, each output and gradient must be within twice the bf16 reference's own error."""
    L = 256
    ids = jnp.asarray(_segment_ids(L))
    q, k, v = _qkv(L, jnp.bfloat16)
    exact = _loss_and_grads(_reference(ids), *(x.astype(jnp.float32) for x in (q, k, v)))
    want = _loss_and_grads(_reference(ids), q, k, v)
    got = _loss_and_grads(lambda q, k, v: attention.packed(q, k, v, ids, impl), q, k, v)
    for name, x, y, z in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (want[0], *want[1]),
                             (exact[0], *exact[1])):
        assert x.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(x))), name
        err, err_ref = (float(jnp.abs(a.astype(jnp.float32) - z).max()) for a in (x, y))
        assert err <= 2 * err_ref, (name, err, err_ref)


def test_splash_many_blocks_matches_reference():
    """L=640 tiles splash into 5x5 blocks of 128: masked blocks are skipped, partial ones masked."""
    L = 640
    ids = jnp.asarray(_segment_ids(L))
    q, k, v = _qkv(L, jnp.float32, seed=2)
    got = _loss_and_grads(lambda q, k, v: attention.packed(q, k, v, ids, "splash"), q, k, v)
    _assert_close(got, _loss_and_grads(_reference(ids), q, k, v), atol=2e-5)


def test_cudnn_math_matches_reference_on_unpacked_rows():
    """cuDNN's call (here on XLA's backend) serves one document per row: `segment_ids=None`."""
    L = 128
    q, k, v = _qkv(L, jnp.float32)
    one_doc = jnp.ones((B, L), jnp.int32)
    got = _loss_and_grads(lambda q, k, v: attention.packed(q, k, v, None, "cudnn"), q, k, v)
    _assert_close(got, _loss_and_grads(_reference(one_doc), q, k, v), atol=2e-5)
    # Rows of one document then padding: exact on the real tokens, which is all any loss reads.
    ids = np.zeros((B, L), np.int32)
    for row, n in enumerate((L, 100, 1, 64)):
        ids[row, :n] = 1
    real = jnp.asarray(ids[:, :, None, None] > 0)
    got = _loss_and_grads(lambda q, k, v: jnp.where(real, attention.packed(q, k, v, None, "cudnn"), 0), q, k, v)
    want = _loss_and_grads(lambda q, k, v: jnp.where(real, _reference(jnp.asarray(ids))(q, k, v), 0), q, k, v)
    _assert_close(got, want, atol=2e-5)


def test_cudnn_refuses_packed_batches():
    for call in (lambda: attention.check_packed_support("cudnn"),
                 lambda: attention.packed(*_qkv(128, jnp.float32), jnp.asarray(_segment_ids(128)), "cudnn")):
        with pytest.raises(ValueError, match=r"ModelConfig.attention='cudnn'.*segment ids.*'pallas_gpu'.*'xla'"):
            call()
    for impl in ("xla", *KERNELS):
        attention.check_packed_support(impl)
    with pytest.raises(ValueError, match="ModelConfig.attention must be one of"):
        attention.check_packed_support("flash")


@pytest.mark.parametrize("impl,L,field", (("splash", 192, "multiple of 128"), ("pallas_gpu", 136, "multiple of 16")))
def test_sequence_length_the_kernel_cannot_tile(impl, L, field):
    ids = jnp.ones((B, L), jnp.int32)
    with pytest.raises(ValueError, match=rf"attention='{impl}'.*{field}.*L={L}.*DataConfig.seq_len"):
        attention.packed(*_qkv(L, jnp.float32), ids, impl)


@pytest.mark.parametrize("impl,mesh_shape", [(impl, shape) for impl in KERNELS for shape in ((2, 4, 1), (2, 2, 2))]
                         + [("cudnn", (2, 2, 2))], ids=lambda p: "x".join(map(str, p)) if isinstance(p, tuple) else p)
def test_kernel_under_mesh_matches_reference(impl, mesh_shape):
    """Inside jit on an 8-device mesh: shard_map over batch (data x fsdp) and heads (tensor)."""
    L = 128
    q, k, v = (jnp.concatenate([a, b]) for a, b in zip(_qkv(L, jnp.float32), _qkv(L, jnp.float32, seed=3)))
    ids = jnp.asarray(np.concatenate([_segment_ids(L), _segment_ids(L)[::-1]]))  # 8 rows
    seg = None if impl == "cudnn" else ids
    want = _loss_and_grads(_reference(jnp.ones_like(ids) if seg is None else ids), q, k, v)
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.resolve_rules(None)
    with jax.set_mesh(mesh):
        got = _loss_and_grads(jax.jit(lambda q, k, v: attention.packed(q, k, v, seg, impl, rules=rules)), q, k, v)
    want_spec = PartitionSpec(("data", "fsdp"), None, "tensor", None)
    assert got[0].sharding.is_equivalent_to(NamedSharding(mesh, want_spec), 4), got[0].sharding
    _assert_close(jax.device_get(got), want, atol=2e-5)


def test_runs_natively_on_its_own_platform_only():
    """`model_dir.load` keeps a run's trained kernel only where this says it runs natively."""
    assert all(attention.runs_natively("xla", b) for b in ("cpu", "gpu", "tpu"))
    for impl, native in (("cudnn", "gpu"), ("pallas_gpu", "gpu"), ("splash", "tpu")):
        assert [b for b in ("cpu", "gpu", "tpu") if attention.runs_natively(impl, b)] == [native], impl
        assert attention.runs_natively(impl) == (jax.default_backend() == native)
    with pytest.raises(ValueError, match="ModelConfig.attention must be one of"):
        attention.runs_natively("flash", "gpu")
