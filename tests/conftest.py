"""Test setup: 8 CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

SPM_TEST_DOCS = 1500
SPM_TEST_VOCAB = 1024


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> str:
    """A real SentencePiece model trained on the first documents of the bundled corpus."""
    import itertools

    from lime_jax import corpus
    from lime_jax.annotation import spm

    texts = (t for _, t in itertools.islice(corpus.iter_documents(corpus.BUNDLED["train"]), SPM_TEST_DOCS))
    return spm.train_spm(texts, str(tmp_path_factory.mktemp("spm") / "spm"), SPM_TEST_VOCAB)


@pytest.fixture(scope="session")
def annotator():
    """The real spaCy English pipeline (parser and lemmatizer off), loaded once per session."""
    from lime_jax.annotation.annotator import SpacyAnnotator

    return SpacyAnnotator()


@pytest.fixture(autouse=True)
def _fresh_gin():
    """Gin bindings are global: a test must not see the previous test's config."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()
