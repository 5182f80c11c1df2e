"""The distillation losses as plain functions of tensors, the hint adaptor, and one ``TermLoss``
per loss kind (what a ``LossEntry`` in ``edgekd.distill.config.LOSSES`` names).

None of these know about models: the objective feeds them logits and hooked features.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# -- logits: Hinton et al. 2015 --------------------------------------------------------------------
def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Per-sample z-score over the classes (Sun et al. 2024, "Logit Standardization in Knowledge
    Distillation"): the soft targets then depend on the ranking and relative gaps of the logits, not
    on their scale, so a teacher with large logits (std 5-20) no longer gives near-one-hot targets
    and a student is not pushed to match the teacher's logit magnitude."""
    logits = logits.float()
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + eps)


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the samples with a label (label -1: an input without one); 0 when none has."""
    known = labels >= 0
    if bool(known.all()):
        return F.cross_entropy(logits.float(), labels)
    if not bool(known.any()):
        return logits.float().sum() * 0.0  # keeps the graph (and DDP's gradient hooks) intact
    return F.cross_entropy(logits.float()[known], labels[known])


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float,
            alpha: float, standardize: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha)·CE(s, y).

    The T² keeps the soft term's gradients the same size whatever T is (Hinton et al. 2015, §2).
    ``standardize`` z-scores both logits first (``standardize_logits``). Samples labelled -1 have no
    hard label: the CE term averages over the others (``masked_cross_entropy``).
    """
    t = temperature
    s, te = student_logits.float(), teacher_logits.float()
    if standardize:
        s, te = standardize_logits(s), standardize_logits(te)
    soft = F.kl_div(F.log_softmax(s / t, dim=1), F.log_softmax(te / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    hard = masked_cross_entropy(student_logits, labels)
    return alpha * soft + (1 - alpha) * hard, {"kd_soft": soft.detach(), "ce": hard.detach()}


# -- features: FitNets (Romero et al. 2015) --------------------------------------------------------
def _channel_layout(student: torch.Size, teacher: torch.Size) -> str:
    """Where the channels are: "first" (N, C, ...) for conv maps, "last" (N, tokens, D) for
    transformer tokens, decided by which dimension the two shapes agree on."""
    if len(student) == 3 and student[1] == teacher[1] and student[2] != teacher[2]:
        return "last"
    return "first"


class HintAdaptor(nn.Module):
    """Maps a student feature onto the teacher's shape: a 1x1 conv (or linear) when the channel
    counts differ, then average pooling when the spatial size differs. Training-only."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        super().__init__()
        if len(student_shape) != len(teacher_shape):
            raise ValueError(f"cannot match a feature of shape {tuple(student_shape)} to one of shape "
                             f"{tuple(teacher_shape)} (different number of dimensions)")
        self.layout = _channel_layout(student_shape, teacher_shape)
        dims = len(student_shape)
        if self.layout == "last" or dims == 2:
            cs, ct = student_shape[-1], teacher_shape[-1]
            self.proj = nn.Linear(cs, ct, bias=False) if cs != ct else nn.Identity()
        else:
            cs, ct = student_shape[1], teacher_shape[1]
            convs = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
            if dims not in convs:
                raise ValueError(f"hint features must have 2 to 5 dimensions, got shape {tuple(student_shape)}")
            self.proj = convs[dims](cs, ct, kernel_size=1, bias=False) if cs != ct else nn.Identity()
        self.spatial = tuple(teacher_shape[2:]) if self.layout == "first" and dims > 2 else None
        self.resize = self.spatial is not None and tuple(student_shape[2:]) != self.spatial

    @property
    def is_identity(self) -> bool:
        return isinstance(self.proj, nn.Identity) and not self.resize

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        if self.resize:
            pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(self.spatial)]
            x = pool(x, self.spatial)
        return x


def hint_loss(adapted_student: Tensor, teacher: Tensor) -> Tensor:
    return F.mse_loss(adapted_student.float(), teacher.float())


# -- attention transfer: Zagoruyko & Komodakis 2017 ------------------------------------------------
def attention_map(feature: Tensor, p: int = 2, size: tuple[int, ...] | None = None) -> Tensor:
    """(N, C, *spatial) → (N, prod(spatial)): mean over channels of |f|^p, L2-normalised per sample."""
    if feature.dim() < 3:
        raise ValueError(f"attention transfer needs spatial features (N, C, ...), got shape {tuple(feature.shape)}")
    amap = feature.float().abs().pow(p).mean(1)
    if size is not None and tuple(amap.shape[1:]) != tuple(size):
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}[len(size)]
        amap = pool(amap.unsqueeze(1), size).squeeze(1)
    return F.normalize(amap.flatten(1), dim=1)


def attention_loss(student: Tensor, teacher: Tensor, p: int = 2) -> Tensor:
    """Squared distance of the two maps (the student's resized to the teacher's spatial size)."""
    return (attention_map(student, p, tuple(teacher.shape[2:])) - attention_map(teacher, p)).pow(2).mean()


# -- relational KD: Park et al. 2019 ---------------------------------------------------------------
def _pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Huber loss between the pairwise distances, each normalised by its mean (scale-free)."""
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    with torch.no_grad():
        td = _pairwise_distances(t)
        td = td / td[td > 0].mean().clamp(min=1e-12)
    sd = _pairwise_distances(s)
    sd = sd / sd[sd > 0].mean().clamp(min=1e-12)
    return F.smooth_l1_loss(sd, td)


def _angles(e: Tensor) -> Tensor:
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """Huber loss between the cosines of the angles every triplet forms."""
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    with torch.no_grad():
        ta = _angles(t)
    return F.smooth_l1_loss(_angles(s), ta)


# -- one loss term of a recipe, as the objective runs it --------------------------------------------
@dataclass(frozen=True)
class KDSettings:
    """The ``distill`` section's settings every term may read (the kd term does)."""

    temperature: float = 4.0
    alpha: float = 0.9
    standardize: bool = False


@dataclass
class TermInputs:
    """One step's outputs of both models: logits (N, classes) and the hooked features by layer name
    (shapes as the layers give them); ``labels`` (N,) with -1 for an input without a label."""

    student_logits: Tensor
    teacher_logits: Tensor
    student_features: Mapping[str, Tensor]
    teacher_features: Mapping[str, Tensor]
    labels: Tensor

    def student(self, layer: str | None) -> Tensor:
        """The named student layer's output, or the logits for None."""
        return self.student_logits if layer is None else self.student_features[layer]

    def teacher(self, layer: str | None) -> Tensor:
        return self.teacher_logits if layer is None else self.teacher_features[layer]


TermValue = tuple[Tensor, dict[str, Tensor]]


def term_layers(term: Any) -> tuple[str | None, str | None]:
    """(student layer, teacher layer) a recipe term reads; None means the model's logits."""
    return getattr(term, "student_layer", None), getattr(term, "teacher_layer", None)


class TermLoss(ABC):
    """One loss term of a recipe (a ``distill.losses`` item), as the objective computes it.

    A subclass is the ``loss`` of a ``LossEntry`` (``edgekd.distill.config.LOSSES``). It reads the
    layers ``layers()`` names, may build a training-only module once it knows the feature shapes
    (``build``: trained with the student, checkpointed, never exported) and returns its unweighted
    loss and the detached values to log (``__call__``). ``check`` rejects feature shapes the term
    cannot use (``ValueError``, the stage turns it into a recipe error naming the term).
    """

    def __init__(self, term: Any, index: int, settings: KDSettings) -> None:
        self.term, self.index, self.settings = term, index, settings
        self.module: nn.Module | None = None

    def layers(self) -> tuple[str | None, str | None]:
        """(student layer, teacher layer) the term reads; None means the model's logits."""
        return term_layers(self.term)

    def check(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        """``ValueError`` (with what to change) when the term cannot compare features of these shapes.
        Any shapes by default (a term on the logits)."""
        return None

    def build(self, student_shape: torch.Size, teacher_shape: torch.Size) -> nn.Module | None:
        """The term's trainable module for features of these shapes, or None (the default)."""
        return None

    @abstractmethod
    def __call__(self, inputs: TermInputs) -> TermValue:
        """The term's unweighted loss (a scalar) and the detached values to log."""


class KDLoss(TermLoss):
    """``kd_loss`` on the logits with the section's temperature, alpha and standardisation."""

    def __call__(self, inputs: TermInputs) -> TermValue:
        s = self.settings
        return kd_loss(inputs.student_logits, inputs.teacher_logits, inputs.labels, temperature=s.temperature,
                       alpha=s.alpha, standardize=s.standardize)


def _same_rank(student_shape: torch.Size, teacher_shape: torch.Size) -> None:
    if len(student_shape) != len(teacher_shape):
        raise ValueError("needs features of the same rank; pair layers of the same kind (e.g. two conv blocks)")


class HintLoss(TermLoss):
    """``hint_loss`` after the ``HintAdaptor`` that maps the student's feature to the teacher's shape."""

    def check(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        _same_rank(student_shape, teacher_shape)
        HintAdaptor(student_shape, teacher_shape)  # ValueError for ranks it cannot map

    def build(self, student_shape: torch.Size, teacher_shape: torch.Size) -> nn.Module:
        return HintAdaptor(student_shape, teacher_shape)

    def __call__(self, inputs: TermInputs) -> TermValue:
        s_layer, t_layer = self.layers()
        loss = hint_loss(self.module(inputs.student(s_layer)), inputs.teacher(t_layer))
        return loss, {f"hint{self.index}": loss.detach()}


class AttentionLoss(TermLoss):
    """``attention_loss`` with the term's exponent ``p``."""

    def check(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        _same_rank(student_shape, teacher_shape)
        if len(student_shape) < 3:
            raise ValueError("attention transfer needs spatial feature maps (N, C, H, W); name conv layers or "
                             "blocks, or use kind: hint")

    def __call__(self, inputs: TermInputs) -> TermValue:
        s_layer, t_layer = self.layers()
        loss = attention_loss(inputs.student(s_layer), inputs.teacher(t_layer), self.term.p)
        return loss, {f"attention{self.index}": loss.detach()}


class RKDLoss(TermLoss):
    """distance_weight·``rkd_distance`` + angle_weight·``rkd_angle`` of the logits or the named layers."""

    def __call__(self, inputs: TermInputs) -> TermValue:
        s_layer, t_layer = self.layers()
        s, t = inputs.student(s_layer), inputs.teacher(t_layer)
        distance, angle = rkd_distance(s, t), rkd_angle(s, t)
        loss = self.term.distance_weight * distance + self.term.angle_weight * angle
        i = self.index
        return loss, {f"rkd{i}_distance": distance.detach(), f"rkd{i}_angle": angle.detach()}
