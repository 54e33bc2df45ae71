"""Training metrics: TensorBoard event files, a JSONL log, a progress display, and MFU.

Model FLOPs per token (the PaLM appendix-B accounting, training = forward + backward = 3x fwd):

    flops_per_token = 6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len

- `N_matmul` counts parameters that take part in a matmul: every parameter except the input
  embedding tables (token and metadata lookups are gathers, no FLOPs), plus the LM head
  (`vocab * d_model`) even when it is tied to the token table, since the head is a real matmul.
- The attention term counts QK^T and AV over the full `seq_len` (2 matmuls x 2 FLOPs per
  multiply-add x 3 for fwd+bwd), ignoring the causal mask, as PaLM does.
- Tokens are all `B * L` positions of a step, padding included (compute is spent on them).

MFU = flops_per_token * tokens / step_seconds / (peak_flops_per_device * num_devices).
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator, Mapping

from lime_jax import progress as progress_lib

log = logging.getLogger(__name__)

# Dense bf16 peak per device (FLOP/s) for the MFU denominator when none is configured. CPU has
# no meaningful datasheet peak: there MFU is only reported when a peak is given (the benchmark
# measures one with a large matmul).
KNOWN_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def peak_flops_for(device_kind: str) -> float | None:
    for prefix, flops in KNOWN_PEAK_FLOPS.items():
        if device_kind.startswith(prefix):
            return flops
    return None


def matmul_params(cfg, total_params: int) -> int:
    """`N_matmul` of the module docstring, from a ModelConfig and the total parameter count."""
    tables = cfg.vocab_size * cfg.d_model + sum(size * cfg.d_model for _, size in cfg.metadata)
    head = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    return total_params - tables + head


def flops_per_token(cfg, total_params: int, seq_len: int) -> float:
    """Training FLOPs per token (see the module docstring for the formula)."""
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len
    return 6.0 * matmul_params(cfg, total_params) + attention


def mfu(flops_per_step: float, step_seconds: float, peak_flops_total: float) -> float:
    return flops_per_step / step_seconds / peak_flops_total


class MetricsWriter:
    """Writes scalars to TensorBoard event files and `metrics.jsonl` in the model dir.

    Only the chief process writes (the one with `enabled=True`); the others keep a no-op writer
    so the calling code needs no branches. A run resumed at `resume_step` first drops the jsonl
    rows of later steps (written before a kill, then lost with the uncheckpointed steps) and a
    line cut short by the kill, so every step appears once, from the timeline that survived.
    """

    def __init__(self, model_dir: str, enabled: bool = True, jsonl_name: str = "metrics.jsonl",
                 resume_step: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # deferred: only the chief writes events

        os.makedirs(model_dir, exist_ok=True)
        path = os.path.join(model_dir, jsonl_name)
        if resume_step is not None and os.path.exists(path):
            _truncate_jsonl(path, resume_step)
        self._tb = SummaryWriter(logdir=os.path.join(model_dir, "tb"), flush_secs=10)
        self._jsonl = open(path, "a", encoding="utf-8")

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        for k, v in clean.items():
            if math.isfinite(v):
                self._tb.add_scalar(f"{prefix}{k}", v, global_step=step)
        row = {"step": int(step), **{f"{prefix}{k}": (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self.enabled = False


def _truncate_jsonl(path: str, last_step: int) -> None:
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line, cut short by a kill
                dropped += 1
                continue
            if row.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        log.info("%s: dropped %d row(s) after step %d (lost with the steps after the checkpoint)",
                 path, dropped, last_step)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_event_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Parses every TensorBoard event file under `logdir`: tag -> [(step, value)].

    Reads the TFRecord framing (length, crc, payload, crc) and decodes `Event` protos with
    tensorboardX's own proto classes, so it needs neither TensorFlow nor tensorboard.
    """
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for root, _, files in os.walk(logdir):
        for name in sorted(files):
            if "tfevents" not in name:
                continue
            for payload in _tfrecords(os.path.join(root, name)):
                event = event_pb2.Event.FromString(payload)
                for v in event.summary.value:
                    out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out


def _tfrecords(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while header := f.read(12):
            if len(header) < 12:
                raise ValueError(f"{path}: truncated record header")
            (length,) = struct.unpack("<Q", header[:8])
            payload = f.read(length)
            if len(payload) != length or len(f.read(4)) != 4:
                raise ValueError(f"{path}: truncated record")
            yield payload


class Progress(progress_lib.Progress):
    """The training-step bar: on no terminal, `step N/T loss=... eta=...` every `log_every` steps
    (and at the last) in the trainer's log."""

    def __init__(self, total_steps: int, start_step: int, log_every: int, enabled: bool = True):
        super().__init__(total_steps, "step", initial=start_step, every_n=log_every, enabled=enabled,
                         log=lambda line: log.info("%s", line))
