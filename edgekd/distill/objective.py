"""The distillation objective: the student's loss against the teacher, for ``fit``.

It owns the teacher, the forward hooks on both models, the hint adaptors (trained with the
student, checkpointed by the trainer, never exported) and the teacher-output cache.

Teacher-output cache: the teacher is frozen and in eval mode, and without ``augment`` the
training batches are the ``DataBundle``'s samples as they are, so the teacher's logits (and
hooked features) for a sample are the same every epoch. They are computed once, kept on the
training device and looked up by sample index, which removes the teacher's forward pass from
every training step. With ``augment`` the trainer calls ``inputs_vary`` and the cache stays off.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from edgekd.data.bundle import DataBundle
from edgekd.distill.config import FROM_SCRATCH, LOSSES, DistillConfig, LossTerm
from edgekd.distill.hooks import FeatureTap
from edgekd.distill.losses import KDSettings, TermInputs, TermLoss, masked_cross_entropy, term_layers
from edgekd.models.evaluate import top1_accuracy
from edgekd.train.objectives import Batch, LossOutput, Objective

#: teacher forward passes while building the cache run on chunks of this many samples
CACHE_CHUNK = 256


def term_losses(losses: list[LossTerm], settings: KDSettings) -> list[TermLoss]:
    """The ``TermLoss`` of each recipe term, from its registry entry (``LOSSES[term.kind].loss``)."""
    return [LOSSES[term.kind].loss(term, i, settings) for i, term in enumerate(losses)]


class DistillObjective(Objective):
    """The student's loss: the weighted sum of the recipe's terms (each run by its ``TermLoss``), plus the
    hard-label cross-entropy when no term includes it. ``teacher`` returns logits (N, classes)."""

    def __init__(self, teacher: nn.Module, losses: list[LossTerm], *, temperature: float = 4.0,
                 alpha: float = 0.9, cache: bool = True, cache_max_mb: float = 1024.0,
                 standardize: bool = False, soft_until_teacher: bool = False) -> None:
        self.teacher = teacher
        self.soft_until_teacher = soft_until_teacher
        #: the teacher's val top-1 (percent), measured in ``setup`` when ``soft_until_teacher``
        self.teacher_val_accuracy: float | None = None
        #: the epoch from which the soft share is 0 (None: still on)
        self.soft_off_from: int | None = None
        self.losses = list(losses)
        self.temperature, self.alpha, self.standardize = temperature, alpha, standardize
        self.use_cache, self.cache_max_mb = cache, cache_max_mb
        self.student_layers = sorted({s for s, _ in map(term_layers, self.losses) if s is not None})
        self.teacher_layers = sorted({t for _, t in map(term_layers, self.losses) if t is not None})
        self.adaptors = nn.ModuleDict()
        self.cache_info: dict[str, Any] = {"enabled": False, "reason": "not built yet"}
        self._cache: dict[str, Tensor] | None = None
        self._cache_off_reason = "teacher_cache: false"
        self._student_tap: FeatureTap | None = None
        self._teacher_tap: FeatureTap | None = None
        self._teacher_device: torch.device | None = None
        self._teacher_was_training = False
        self.terms = term_losses(self.losses, KDSettings(temperature, alpha, standardize))
        self._adds_ce = not any(LOSSES[t.kind].hard_labels for t in self.losses)

    @classmethod
    def from_config(cls, teacher: nn.Module, config: DistillConfig) -> DistillObjective:
        # alpha is None only in a config not made concrete (``DistillConfig.concrete``): the from-scratch default
        alpha = config.alpha if config.alpha is not None else FROM_SCRATCH["alpha"]
        return cls(teacher, config.losses, temperature=config.temperature, alpha=alpha,
                   cache=config.teacher_cache, cache_max_mb=config.cache_max_mb,
                   standardize=config.logit_standardization,
                   soft_until_teacher=config.soft_until_teacher and config.source is None)

    # -- set-up -------------------------------------------------------------------------------
    def inputs_vary(self) -> None:
        if self.use_cache:
            self.use_cache = False
            self._cache_off_reason = "augment is on: the teacher sees each step's augmented view"

    def setup(self, model: nn.Module, data: DataBundle, device: torch.device) -> None:
        self._teacher_device = next(self.teacher.parameters()).device
        self._teacher_was_training = self.teacher.training
        # the teacher is only ever run under no_grad: its parameters are left as they are
        self.teacher.to(device).eval()
        self._student_tap = FeatureTap(model, self.student_layers, role="student")
        self._teacher_tap = FeatureTap(self.teacher, self.teacher_layers, role="teacher")
        example = data.example_batch(2).to(device)
        probe = self._probe(model, example)
        t_feats = probe.teacher_features
        for term in self.terms:
            key = str(term.index)  # the checkpoint's key of the term's module: kept across resumes
            if key not in self.adaptors:
                s_layer, t_layer = term.layers()
                module = term.build(probe.student(s_layer).shape, probe.teacher(t_layer).shape)
                if module is not None:
                    self.adaptors[key] = module
            term.module = self.adaptors[key] if key in self.adaptors else None
        self.adaptors.to(device)
        if self.soft_until_teacher:
            self.teacher_val_accuracy = top1_accuracy(self.teacher, data.val_x, data.val_y, device=device)
        self._cache = self._build_cache(data, device, t_feats) if self.use_cache else None
        if not self.use_cache:
            self.cache_info = {"enabled": False, "reason": self._cache_off_reason}

    def _probe(self, model: nn.Module, example: Tensor) -> TermInputs:
        """Both models' logits and hooked features on ``example`` (eval mode, no labels)."""
        was_training = model.training
        try:
            with torch.no_grad():
                s_logits = model.eval()(example)
                t_logits = self.teacher(example)
        finally:
            model.train(was_training)
        return TermInputs(s_logits, t_logits, dict(self._student_tap.features), dict(self._teacher_tap.features),
                          labels=torch.full((len(example),), -1, dtype=torch.long, device=example.device))

    def _build_cache(self, data: DataBundle, device: torch.device, t_feats: dict[str, Tensor]) -> dict | None:
        n = len(data.train)
        per_sample = data.num_classes + sum(math.prod(f.shape[1:]) for f in t_feats.values())
        megabytes = n * per_sample * 4 / 2**20
        if megabytes > self.cache_max_mb:
            self.cache_info = {"enabled": False, "megabytes": round(megabytes, 1),
                               "reason": f"needs {megabytes:.0f} MB > cache_max_mb {self.cache_max_mb:g}"}
            return None
        started = time.perf_counter()
        chunks: dict[str, list[Tensor]] = {"logits": [], **{name: [] for name in self.teacher_layers}}
        with torch.no_grad():
            for start in range(0, n, CACHE_CHUNK):
                x = data.train_x[start:start + CACHE_CHUNK].to(device).contiguous()
                chunks["logits"].append(self.teacher(x).float())
                for name in self.teacher_layers:
                    chunks[name].append(self._teacher_tap.features[name].float())
        cache = {name: torch.cat(parts) for name, parts in chunks.items()}
        self.cache_info = {"enabled": True, "megabytes": round(megabytes, 2),
                           "build_time_s": round(time.perf_counter() - started, 4), "samples": n}
        return cache

    def extra_modules(self) -> nn.Module | None:
        return self.adaptors if len(self.adaptors) else None

    def before_epoch(self, epoch: int, history: list[dict]) -> None:
        """``soft_until_teacher``: once an epoch's val top-1 has reached the teacher's, the kd term's soft share
        is 0 for every later epoch (the hard-label cross-entropy alone). A decision on val; taken from
        ``history`` alone, so a resumed or rolled-back run takes it at the same epoch. Early-stopped KD (Cho &
        Hariharan 2019, "On the Efficacy of Knowledge Distillation") stops the soft term at a fixed epoch;
        this stops it when the teacher has nothing left to teach on val."""
        if not self.soft_until_teacher or self.teacher_val_accuracy is None:
            return
        reached = [row.get("epoch", i) for i, row in enumerate(history, start=1)
                   if row.get("val_accuracy", -1.0) >= self.teacher_val_accuracy]
        self.soft_off_from = reached[0] + 1 if reached else None
        alpha = 0.0 if self.soft_off_from is not None else self.alpha
        for term in self.terms:
            if term.settings.alpha != alpha:
                term.settings = replace(term.settings, alpha=alpha)

    def teardown(self) -> None:
        for tap in (self._student_tap, self._teacher_tap):
            if tap is not None:
                tap.remove()
        self._student_tap = self._teacher_tap = None
        self._cache = None
        if self._teacher_device is not None:
            self.teacher.to(self._teacher_device).train(self._teacher_was_training)

    # -- the loss -----------------------------------------------------------------------------
    def _teacher_outputs(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if self._cache is not None:
            index = batch.index.to(self._cache["logits"].device)
            return self._cache["logits"][index], {name: self._cache[name][index] for name in self.teacher_layers}
        with torch.no_grad():
            logits = self.teacher(batch.x)
        return logits, dict(self._teacher_tap.features)

    def compute(self, model: nn.Module, batch: Batch) -> LossOutput:
        self._student_tap.clear()
        s_logits = model(batch.x)
        s_feats = self._student_tap.features
        t_logits, t_feats = self._teacher_outputs(batch)
        inputs = TermInputs(s_logits, t_logits, s_feats, t_feats, batch.y)
        total = torch.zeros((), device=s_logits.device)
        parts: dict[str, Tensor] = {}
        for term in self.terms:
            loss, logged = term(inputs)
            total = total + term.term.weight * loss
            parts.update(logged)
        if self._adds_ce:
            ce = masked_cross_entropy(s_logits, batch.y)
            total = total + ce
            parts["ce"] = ce.detach()
        return LossOutput(total=total, logits=s_logits, parts=parts)

    def describe(self) -> dict[str, Any]:
        return {"objective": "distill", "temperature": self.temperature, "alpha": self.alpha,
                "logit_standardization": self.standardize, "soft_until_teacher": self.soft_until_teacher,
                "teacher_val_accuracy": self.teacher_val_accuracy, "soft_off_from_epoch": self.soft_off_from,
                "losses": [t.model_dump() for t in self.losses], "teacher_cache": self.cache_info,
                "adaptors": {i: type(getattr(a, "proj", a)).__name__ for i, a in self.adaptors.items()}}
