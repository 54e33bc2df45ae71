"""Data: the ArrayRecord cache (`cache`), the Grain loader (`loader`), packing rules
(`packing`), evaluation generators (`synthetic`) and the SeqIO feature converter
(`seqio_features`, imports TensorFlow). Submodules are imported explicitly so that
`import lime_jax.data` stays cheap."""
