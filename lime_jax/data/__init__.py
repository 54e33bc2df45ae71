"""Data: the ArrayRecord cache (`cache`), the Grain loader (`loader`), packing rules
(`packing`), evaluation generators (`synthetic`), the SeqIO feature converter
(`seqio_features`) and batches from a SeqIO task or mixture (`seqio_source`; both import
TensorFlow). Submodules are imported explicitly so that
`import lime_jax.data` stays cheap."""
