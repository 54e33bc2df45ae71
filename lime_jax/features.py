"""Names of tag-head features, shared by the data pipeline and the model (no jax here).

A tag head (lime_jax/model/heads.py) predicting tag feature `pos` of token i+1 is `pos_ahead1`
in params and metrics; its targets are the batch feature `decoder_target_pos_ahead1`.
"""

def head_id(name: str, ahead: int) -> str:
    return f"{name}_ahead{ahead}"


def target_feature(name: str, ahead: int) -> str:
    return f"decoder_target_{head_id(name, ahead)}"
