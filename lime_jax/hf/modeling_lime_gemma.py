"""LIME on transformers' Gemma: the modelling file of a `lime-jax export` of a LIME model.

`lime-jax export` copies this file into the export and registers it in config.json's auto_map, so
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads it. lime_jax itself never
imports it (it needs torch and transformers).

The decoder is transformers' Gemma unchanged. LIME adds one embedding table per tag type (LIME,
arXiv 2512.07522), summed into the input exactly as lime_jax's LimeEmbed does:

    x_i = (E_tok[t_i] + sum_d w_d * E_d[a_{i,d}]) * sqrt(hidden_size)

in the order of `config.lime_tables` (`[name, size, w_d]`). Tag id 0 (PAD) adds nothing (row 0 is
zero): "no metadata". `forward` takes the tag ids as `pos_ids` and `ner_ids`, int [B, L] aligned with
`input_ids`; a missing one, and positions past its end, read PAD. What position i carries depends
on `config.lime_shift`: 0 (LIME) the tags of token i, 1 (LIME+1) the tags of token i + 1, the one
the model predicts there. `generate(input_ids, pos_ids=..., ner_ids=...)` reads each step's tags at
its own position, so tags longer than the prompt guide the tokens to come (LIME+1 guidance).
"""
import torch
from torch import nn
from transformers.models.gemma.configuration_gemma import GemmaConfig
from transformers.models.gemma.modeling_gemma import GemmaForCausalLM


class LimeGemmaConfig(GemmaConfig):
    model_type = "lime_gemma"
    lime_tables: list | None = None  # [[name, size, weight], ...]: "pos" and/or "ner"
    lime_shift: int = 0


class LimeGemmaForCausalLM(GemmaForCausalLM):
    config_class = LimeGemmaConfig

    def __init__(self, config):
        super().__init__(config)
        self.lime_tables = nn.ModuleDict({name: nn.Embedding(size, config.hidden_size, padding_idx=0)
                                          for name, size, _ in config.lime_tables})
        self.post_init()

    def lime_embed(self, input_ids, tags, past_length: int) -> torch.Tensor:
        """The LIME input embedding of `input_ids` at positions past_length, past_length + 1, ..."""
        B, L = input_ids.shape
        x = nn.functional.embedding(input_ids, self.model.embed_tokens.weight)
        for name, _, weight in self.config.lime_tables:
            ids = torch.zeros((B, L), dtype=torch.long, device=input_ids.device)
            given = tags.get(name)
            if given is not None:
                given = given[:, past_length:past_length + L]
                ids[:, :given.shape[1]] = given
            x = x + self.lime_tables[name](ids) * weight
        return x * self.model.embed_tokens.embed_scale.to(x.dtype)

    def forward(self, input_ids=None, pos_ids=None, ner_ids=None, past_key_values=None, inputs_embeds=None,
                **kwargs):
        tags = {"pos": pos_ids, "ner": ner_ids}
        unknown = [f"{n}_ids" for n, t in tags.items() if t is not None and n not in self.lime_tables]
        if unknown:
            raise ValueError(f"{unknown} given, but the model has tag tables {list(self.lime_tables)} only")
        if inputs_embeds is None:
            past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
            inputs_embeds = self.lime_embed(input_ids, tags, past_length)
        return super().forward(input_ids=None, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                               **kwargs)
