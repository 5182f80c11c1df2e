"""The distillation losses as plain functions of tensors, and the hint adaptor.

None of these know about models: the objective feeds them logits and hooked features.
"""

from __future__ import annotations

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
