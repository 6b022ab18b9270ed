"""``ContinualMerger``: merge models one at a time with constant memory and durable state.

The state is one float32 tensor per floating tensor of the base (the rule's running quantity, see
:mod:`mergelab.continual.rules`) plus a few scalars -- never the past models. ``add`` streams the
new model tensor by tensor (any checkpoint the engine reads), so memory does not grow with the
number of models or with the model size beyond a few tensors.

A merger with a state folder (``save`` once, or ``load``) commits every ``add`` to that folder
atomically, under the folder's lock, with a checksum of every state tensor
(:mod:`mergelab.continual.state`); without one, the state lives in memory.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from mergelab import threads
from mergelab.continual.rules import RuleCtx, all_rules, get_rule
from mergelab.continual.state import (
    Generation,
    StateSource,
    commit_generation,
    current_name,
    finite,
    generation_name,
    locked,
    open_state_tensors,
    read_current,
    tensor_entry,
    tensor_sha256,
)
from mergelab.continual.steps import Null, as_json, fingerprint, hash_tensor, progress_bar
from mergelab.errors import MergelabError
from mergelab.io.checks import check_models
from mergelab.io.names import resolve_model_name
from mergelab.io.placing import check_new_folder, input_paths
from mergelab.io.safetensors_header import TensorSpec
from mergelab.io.sources import DictSource, TensorSource, open_source
from mergelab.io.writer import CheckpointWriter
from mergelab.methods.registry import Late
from mergelab.ops.device import resolve_device
from mergelab.ops.finite import all_finite
from mergelab.version import __version__


class ContinualMerger:
    """Merge models sequentially: ``cm.add(model)`` one at a time, ``cm.merged()`` at any point.

    Args:
        method: ``"opcm"`` (alpha, seed, projection, non_matrix, exclude, low_rank, rank_tol), ``"continual_ta"``
            (scaling), ``"continual_ties"`` (scaling, density, merge_func) or ``"swa"``.
        base: the pre-trained model (any model-like input). To ``save`` a merger and continue
            it later, pass the base as a path, which the state records.
        device: where per-tensor maths runs (``"cpu"`` or ``"cuda"``).
        **hparams: the rule's hyperparameters (defaults and sources: ``mergelab methods``; the rules are
            registered in :mod:`mergelab.continual.rules`, one module each).

    Example:
        >>> cm = ContinualMerger("opcm", base="base/", alpha=0.5)
        >>> for path in ["task1/", "task2/"]:
        ...     cm.add(path)
        >>> merged = cm.merged()
    """

    def __init__(self, method: str, base: Any, *, device: str = "cpu", **hparams: Any):
        threads.ensure()
        self.rule = get_rule(method)
        self.method = method
        self.hparams = self.rule.resolve(hparams)
        base = resolve_model_name(base)  # a backbone name -> its folder, recorded as such (mergelab.io.names)
        self.base_ref = str(Path(base).resolve()) if isinstance(base, (str, Path)) else None
        self.base = open_source(base, "<base>")
        self.device = resolve_device(device, require=True)
        self.floating = [n for n, s in self.base.specs.items() if s.dtype.is_floating_point]
        self.step = 0
        self.added: list[dict[str, str]] = []
        self.scalars: dict[str, float] = {}
        self._state: TensorSource | None = None
        self._state_dir: Path | None = None
        self._generation: str | None = None  # the generation of _state_dir this merger holds
        self.legacy = False  # loaded from a state written before checksums

    # ------------------------------------------------------------------ public API
    def add(self, model: Any, *, name: str | None = None, force: bool = False, progress: bool | None = None) -> None:
        """Merge one more model. Refuses a model already added (same content hash) unless ``force``.

        A first, cheap pass hashes the model and checks the state's tensors before any merge maths,
        so a duplicate or a corrupted state is refused in the time of a read, not of the merge.
        ``progress``: a bar on stderr (default: when stderr is a terminal)."""
        source = open_source(model, name or f"<model {self.step + 1}>")
        check_models(self.base, [source])
        label = name or source.label
        show = sys.stderr.isatty() if progress is None else progress
        with locked(self._state_dir) if self._state_dir is not None else Null():
            self._check_not_moved()
            content = self._check_inputs(source, show)
            previous = next((m for m in self.added if m["sha256"] == content), None)
            if previous is not None and not force:
                raise MergelabError(
                    f"already added as step {self.added.index(previous) + 1} ({previous['name']}); same content "
                    "hash (use force=True / --force to add it again)",
                    file=source.label,
                )
            self._merge(source, {"name": label, "sha256": content}, show)

    def _check_inputs(self, source: TensorSource, show: bool) -> str:
        """The model's content hash; refuses NaN/Inf in it and checks each state tensor (checksum,
        finite values) on the way -- one streaming read of both, no merge maths."""
        digest = hashlib.sha256()
        with progress_bar(show, self._floating_bytes(), "check") as bar:
            for tensor_name in self.floating:
                raw = source.get(tensor_name)
                hash_tensor(digest, tensor_name, raw)
                if not finite(raw):
                    raise MergelabError("contains NaN or Inf values", file=source.file_of(tensor_name), tensor=tensor_name)
                source.release(tensor_name)
                if self._state is not None:
                    self._state.get(tensor_name)  # a StateSource checks it here, once
                    self._state.release(tensor_name)
                bar.update(self.base.specs[tensor_name].nbytes)
        return digest.hexdigest()

    def _merge(self, source: TensorSource, entry: dict[str, str], show: bool) -> None:
        """The merge pass: the new state, written as a generation and committed (or kept in memory)."""
        stats = self._statistics(source) if self.rule.stats is not None and self.step > 0 else None
        late = self.rule.late(self.hparams, stats) if self.rule.late is not None and stats is not None else None
        new_state: dict[str, torch.Tensor] = {}
        checksums: dict[str, str] = {}
        scalars = dict(self.scalars)
        tau_sq = u_sq = 0.0
        writer = self._open_generation(self.step + 1) if self._state_dir is not None else None
        with writer if writer is not None else Null(), progress_bar(show, self._floating_bytes(), self.method) as bar:
            for tensor_name in self.floating:
                base = self.base.get(tensor_name).to(self.device, torch.float32)
                tau = source.get(tensor_name).to(self.device, torch.float32) - base
                if not finite(tau):  # finite inputs whose difference overflows
                    raise MergelabError("differs from the base by more than float32 holds",
                                        file=source.file_of(tensor_name), tensor=tensor_name)
                state = self._state.get(tensor_name).to(self.device, torch.float32) if self._state is not None else None
                ctx = RuleCtx(tensor_name, self._is_matrix(tensor_name), self.step, stats=stats)
                updated = self.rule.update(state, tau, ctx, **self.hparams)
                if late is not None and ctx.late is not None:
                    late.absorb(tensor_name, ctx.late)
                if self.rule.counts_in_norm(ctx, self.hparams):
                    tau_sq += float(tau.double().pow(2).sum())
                    u_sq += float(updated.double().pow(2).sum())
                out = updated.to("cpu", torch.float32).contiguous()
                if not finite(out):  # never commit a state that cannot be read back
                    raise MergelabError("the merged state overflows float32", file=source.file_of(tensor_name),
                                        tensor=tensor_name)
                if writer is not None:
                    writer.write(tensor_name, out)
                    checksums[tensor_name] = tensor_sha256(out)
                else:
                    new_state[tensor_name] = out
                bar.update(self.base.specs[tensor_name].nbytes)
            patched = self._apply_patches(late, writer, new_state) if late is not None else []
            scalars["norm_sum"] = scalars.get("norm_sum", 0.0) + math.sqrt(tau_sq)
            scalars["state_norm_sq"] = u_sq
            if writer is not None:
                generation = writer.commit()
                written = open_source(generation)
                for tensor_name in patched:  # their bytes changed after they were hashed
                    checksums[tensor_name] = tensor_sha256(written.get(tensor_name))
                written.close()
                before = self.step, list(self.added), self.scalars
                self.step, self.added, self.scalars = self.step + 1, [*self.added, entry], scalars
                try:
                    self._commit(generation, writer, checksums)
                except BaseException:  # CURRENT did not move: nor does this merger, and nothing is left
                    self.step, self.added, self.scalars = before
                    if current_name(self._state_dir)[0] != generation.name:  # type: ignore[arg-type]
                        shutil.rmtree(generation, ignore_errors=True)
                    raise
                return
        self.step += 1
        self.added.append(entry)
        self.scalars = scalars
        self._state = DictSource(new_state, "<state>")

    def add_all(self, models: list[Any], *, shuffle: bool = False) -> list[int]:
        """Add several models; with ``shuffle`` in an order drawn from the ``seed`` hyperparameter
        (as FusionBench's ``shuffle_order``). Returns the order used (indices into ``models``)."""
        order = list(range(len(models)))
        if shuffle:
            random.Random(int(self.hparams.get("seed", 0))).shuffle(order)
        for index in order:
            self.add(models[index])
        return order

    def merged(self) -> dict[str, torch.Tensor]:
        """The current merged model: same keys and dtypes as the base, on CPU."""
        if self.step == 0:
            raise MergelabError("no model added yet: call add() first")
        return {name: tensor for name, tensor in self._iter_merged()}

    def export(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write the merged model as a safetensors checkpoint (config files copied from a base folder)."""
        if self.step == 0:
            raise MergelabError("no model added yet: nothing to export")
        layout = [(n, self.base.specs[n]) for n in self.base.specs]
        metadata = {"mergelab.version": __version__, "mergelab.method": self.method,
                    "mergelab.hparams": as_json(self.hparams), "mergelab.inputs": as_json(self.added)}
        inputs = input_paths([self.base]) + ([self._state_dir] if self._state_dir is not None else [])
        with CheckpointWriter(out, layout, metadata, overwrite=overwrite, inputs=inputs) as writer:
            for name, tensor in self._iter_merged():
                if tensor.is_floating_point() and not all_finite(tensor):  # the cast to the base's dtype overflowed
                    raise MergelabError(f"merged values overflow the output dtype {str(tensor.dtype).removeprefix('torch.')}",
                                        file=str(out), tensor=name)
                writer.write(name, tensor)
            return writer.commit(extras_from=self.base.folder)

    def verify(self) -> None:
        """Read every state tensor and check it (checksum, finite values); raises MergelabError."""
        if self._state is None:
            return
        for name in self.floating:
            self._state.get(name)
            self._state.release(name)

    def save(self, state_dir: str | Path) -> Path:
        """Persist the state to ``state_dir``; from now on every ``add`` commits there atomically."""
        if self.base_ref is None:
            raise MergelabError("a merger whose base is not a path cannot be saved: pass base as a path")
        state_dir = Path(state_dir)
        if self._state_dir is not None and state_dir.resolve() == self._state_dir.resolve():
            return state_dir  # every add is already committed there
        if (state_dir / "CURRENT").exists():
            raise MergelabError("already holds a continual-merging state", file=str(state_dir))
        check_new_folder(state_dir, input_paths([self.base]))
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MergelabError(f"cannot create the state folder ({err.strerror or err})", file=str(state_dir)) from None
        with locked(state_dir):
            if (state_dir / "CURRENT").exists():  # created meanwhile by another process
                raise MergelabError("already holds a continual-merging state", file=str(state_dir))
            self._state_dir = state_dir
            if self._state is None:
                commit_generation(state_dir, self._empty_generation(), self._manifest({}))
                self._generation = generation_name(0)
                return state_dir
            writer = self._open_generation(self.step)
            checksums = {}
            with writer:
                for name in self.floating:
                    tensor = self._state.get(name).to(torch.float32).contiguous()
                    writer.write(name, tensor)
                    checksums[name] = tensor_sha256(tensor)
                generation = writer.commit()
            self._commit(generation, writer, checksums)
        return state_dir

    @classmethod
    def load(cls, state_dir: str | Path, *, device: str = "cpu") -> ContinualMerger:
        """Continue from a state folder written by :meth:`save` (or ``mergelab continual init``).

        Checks the manifest (checksum, format, fields) and the state files' headers against it and
        the base; each tensor's content is checked when it is first read (see :meth:`verify`)."""
        state_dir = Path(state_dir)
        generation = read_current(state_dir)
        manifest = generation.manifest
        if manifest["method"] not in all_rules():
            raise MergelabError(f"state manifest: unknown continual method {manifest['method']!r}",
                                file=generation.manifest_file)
        rule = get_rule(manifest["method"])
        try:  # the stored hyperparameters pass the same checks as given ones
            rule.resolve(manifest["hparams"])
        except MergelabError as err:
            raise MergelabError(f"state manifest: {err.message}", file=generation.manifest_file) from None
        hparams = {**rule.legacy, **manifest["hparams"]}  # saved before an option existed: continue as it began
        merger = cls(manifest["method"], manifest["base"], device=device, **hparams)
        if manifest["base_fingerprint"] != fingerprint(merger.base):
            raise MergelabError("the base model changed since this state was created", file=manifest["base"])
        merger.step = manifest["step"]
        merger.added = [{"name": m["name"], "sha256": m["sha256"]} for m in manifest["models"]]
        merger.scalars = {k: float(v) for k, v in manifest["scalars"].items()}
        merger._state_dir = state_dir
        merger._generation = generation.path.name
        merger.legacy = generation.legacy
        merger._state = merger._open_state(generation) if merger.step > 0 else None
        return merger

    # ------------------------------------------------------------------ per-tensor rules
    def _is_matrix(self, name: str) -> bool:
        excluded = any(fnmatch.fnmatchcase(name, pattern) for pattern in self.hparams.get("exclude", []))
        return len(self.base.specs[name].shape) == 2 and not excluded

    def _iter_merged(self) -> Any:
        assert self._state is not None
        floating = set(self.floating)
        for name, spec in self.base.specs.items():
            base = self.base.get(name)
            if name not in floating:  # integer buffers: the base's
                yield name, base.clone()
                continue
            state = self._state.get(name).to(torch.float32)
            ctx = RuleCtx(name, self._is_matrix(name), self.step, self.scalars)
            delta = self.rule.read(state, ctx, **self.hparams)
            yield name, (base.to(torch.float32) + delta).to(spec.dtype)

    def _apply_patches(self, late: Late, writer: CheckpointWriter | None,
                       new_state: dict[str, torch.Tensor]) -> list[str]:
        """The rule's late corrections (``Rule.late``: e.g. the few parameters whose TIES sign needed
        the model-wide majority), added to the previous state; returns the names of the tensors changed."""
        assert self._state is not None
        patches = late.patches()
        for name, (index, delta) in patches.items():
            values = self._state.get(name).reshape(-1)[index].to(torch.float32) + delta
            if writer is not None:
                writer.patch(name, index, values)
            else:
                new_state[name].view(-1)[index] = values
        return list(patches)

    def _statistics(self, source: TensorSource) -> Any:
        """The rule's whole-model statistics over the two rows [current merged task vector, new tau]."""
        assert self._state is not None and self.rule.stats is not None
        collector = self.rule.stats(self.hparams)
        for index in range(collector.n_passes):
            for name in self.floating:
                base = self.base.get(name).to(self.device, torch.float32)
                tau = source.get(name).to(self.device, torch.float32) - base
                state = self._state.get(name).to(self.device, torch.float32)
                collector.observe(index, name, torch.stack([state, tau]), base)
            collector.end_pass(index)
        return collector.result()

    # ------------------------------------------------------------------ persistence
    def _floating_bytes(self) -> int:
        return sum(self.base.specs[n].nbytes for n in self.floating)

    def _check_not_moved(self) -> None:
        """Under the lock: the state folder still holds the generation this merger was built on."""
        if self._state_dir is None:
            return
        name, _ = current_name(self._state_dir)
        if name != self._generation:
            raise MergelabError(f"the state changed since it was loaded (now at {name}, loaded {self._generation}): "
                                "load it again", file=str(self._state_dir))

    def _open_state(self, generation: Generation) -> StateSource:
        expected = {n: TensorSpec(self.base.specs[n].shape, torch.float32) for n in self.floating}
        return open_state_tensors(generation, expected)

    def _commit(self, generation: Path, writer: CheckpointWriter, checksums: dict[str, str]) -> None:
        """Point the state folder at a complete generation, its tensors' checksums in the manifest."""
        assert self._state_dir is not None
        files = {name: shard.filename for shard in writer.shards for name in shard.names}
        tensors = {name: tensor_entry(files[name], TensorSpec(self.base.specs[name].shape, torch.float32), checksums[name])
                   for name in self.floating}
        commit_generation(self._state_dir, generation, self._manifest(tensors))
        self._generation = generation.name
        self.legacy = False
        self._state = self._open_state(read_current(self._state_dir))

    def _open_generation(self, step: int) -> CheckpointWriter:
        assert self._state_dir is not None
        layout = [(n, TensorSpec(self.base.specs[n].shape, torch.float32)) for n in self.floating]
        target = self._state_dir / generation_name(step)
        if target.exists():  # left by an add that was killed before committing
            shutil.rmtree(target)
        return CheckpointWriter(target, layout, {"mergelab.state": self.method})

    def _empty_generation(self) -> Path:
        assert self._state_dir is not None
        target = self._state_dir / generation_name(0)
        target.mkdir(exist_ok=True)
        return target

    def _manifest(self, tensors: dict[str, Any]) -> dict[str, Any]:
        return {
            "tensors": tensors,
            "method": self.method,
            "hparams": self.hparams,
            "step": self.step,
            "models": self.added,
            "scalars": self.scalars,
            "base": self.base_ref,
            "base_fingerprint": fingerprint(self.base),
            "mergelab_version": __version__,
        }
