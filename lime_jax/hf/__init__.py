"""Hugging Face interchange: `lime-jax export` writes a run as a transformers Gemma checkpoint,
`INIT_FROM_HF` starts a run from one (README.md, "Hugging Face export and import").

`gemma` maps parameters and config fields both ways, `export` writes a model dir as an HF dir,
`init` is the trainer's hook for INIT_FROM_HF. `modeling_lime_gemma.py` is not imported here: it
is copied into LIME exports and runs inside transformers (trust_remote_code).
Reading and writing safetensors needs the `hf` extra (`pip install 'lime_jax[hf]'`); nothing here
imports torch or transformers.
"""
