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
import struct
from collections.abc import Iterator, Mapping

from etils import epath

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
    The model dir is an `etils.epath` path, as Orbax's are: local or gs://.
    """

    def __init__(self, model_dir: epath.PathLike, enabled: bool = True, jsonl_name: str = "metrics.jsonl",
                 resume_step: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # deferred: only the chief writes events
        from tensorboardX import record_writer

        # tensorboardX's own gs:// writer needs google-cloud-storage: write events through epath.
        record_writer.register_writer_factory("gs", _EpathEventFiles())
        model_dir = epath.Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        path = model_dir / jsonl_name
        if resume_step is not None and path.exists():
            _truncate_jsonl(path, resume_step)
        tb_dir = model_dir / "tb"
        tb_dir.mkdir(exist_ok=True)
        self._tb = SummaryWriter(logdir=str(tb_dir), flush_secs=10)
        self._jsonl = path.open("a")

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


class _EpathEventFiles:
    """A tensorboardX writer factory: event files opened through epath."""

    def open(self, path: str):
        return epath.Path(path).open("wb")

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _truncate_jsonl(path: epath.Path, last_step: int) -> None:
    kept, dropped = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").split("\n"):
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line, cut short by a kill
            dropped += 1
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        log.info("%s: dropped %d row(s) after step %d (lost with the steps after the checkpoint)",
                 path, dropped, last_step)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def read_jsonl(path: epath.PathLike) -> list[dict]:
    return [json.loads(line) for line in epath.Path(path).read_text().split("\n") if line.strip()]


def read_event_scalars(logdir: epath.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Parses every TensorBoard event file under `logdir`: tag -> [(step, value)].

    Reads the TFRecord framing (length, crc, payload, crc) and decodes `Event` protos with
    tensorboardX's own proto classes, so it needs neither TensorFlow nor tensorboard.
    """
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for root, _, files in epath.Path(logdir).walk():
        for name in sorted(files):
            if "tfevents" not in name:
                continue
            for payload in _tfrecords(root / name):
                event = event_pb2.Event.FromString(payload)
                for v in event.summary.value:
                    out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out


def _tfrecords(path: epath.Path) -> Iterator[bytes]:
    with path.open("rb") as f:
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
