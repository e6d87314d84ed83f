"""SoftCon loss: InfoNCE between the two views plus a label-guided soft contrastive term.

The published SoftCon code (Wang et al., 2024) does not include the training loss, so this module is
the project's own reading of the paper, written out here and kept configurable:

    z  = student embeddings (B, D), z' = teacher embeddings (B, D), both L2-normalised.

    Instance term (symmetric InfoNCE, positive = the same scene's other view):
        S_ij      = <z_i, z'_j> / tau
        instance  = 1/2 * [ mean_i CE(S_i,:, i) + mean_j CE(S_:,j, j) ]
    Both directions are kept (as in CLIP / MoCo v3): the gradient reaches the student through rows and
    columns; the teacher branch (an EMA copy, or the student under no_grad) receives no gradient either way.

    Soft term, over the pairs (i, j) with both i and j labelled (M_ij = 1), soft targets from the labels:
        T_ij = sim(y_i, y_j)                      cosine of multi-hot vectors (default), Jaccard,
                                                  or cosine of class-fraction vectors ("fractions")
        C_ij = <z_i, z'_j>                        embedding cosine similarity
    in one of three forms (``soft_loss``); "sigmoid" is the project's reading of the paper, the other two
    are ablations of it:
        "sigmoid" (SigLIP-style, default):
            P_ij = sigmoid(exp(s) * C_ij + b)     learnable log-scale s (init log 10) and bias b
            soft = mean over M of BCE(P_ij, T_ij)
        "mse":
            soft = mean over M of (C_ij - T_ij)^2
        "soft_ce" (soft-target cross-entropy, row-wise over M):
            q_ij = T_ij / sum_j M_ij T_ij         target distribution of row i
            p_ij = softmax_j over M of (C_ij / tau)   tau: the instance term's temperature
            soft = mean over rows with sum_j M_ij T_ij > 0 of -sum_j M_ij q_ij log p_ij
    "mse" and "soft_ce" do not use s and b; they stay in the graph with a zero gradient, so checkpoints and
    the logged loss_scale / loss_bias keep one shape whatever the form.
    Scenes without labels are masked out of the soft term (their rows and columns), so they contribute
    only to the instance term. An all-zero label vector has similarity 0 to everything (also itself).

    loss = instance + lambda_soft * soft         (lambda_soft = 0 is the hard-contrastive baseline)

Bias initialisation: SigLIP starts at b = -10 because with hard targets only B of the B^2 pairs are
positive. Here the targets are soft and land-cover scenes share classes often (mean T is typically
0.3-0.6), so the default starts at b = 0, where P covers [sigmoid(-10), sigmoid(10)] symmetrically and the
first steps are not spent only on moving the bias. ``init_bias=-10`` gives the SigLIP start.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LabelSimilarity = Literal["cosine", "jaccard", "fractions"]
LABEL_SIMILARITIES: tuple[str, ...] = ("cosine", "jaccard", "fractions")
SoftLoss = Literal["sigmoid", "mse", "soft_ce"]
SOFT_LOSSES: tuple[str, ...] = ("sigmoid", "mse", "soft_ce")


def label_similarity(labels: torch.Tensor, *, kind: LabelSimilarity = "cosine") -> torch.Tensor:
    """Target similarity T (B, B) in [0, 1] between label vectors (B, K).

    ``labels`` is the multi-hot matrix for "cosine" and "jaccard", the class-fraction matrix for
    "fractions" (cosine of non-negative vectors, so also in [0, 1]).
    """
    if kind not in LABEL_SIMILARITIES:
        raise ValueError(f"label similarity {kind!r} is not one of {LABEL_SIMILARITIES}")
    y = labels.float()  # (B, K)
    if kind == "jaccard":
        y = (y > 0).float()
        intersection = y @ y.T  # (B, B)
        union = y.sum(1, keepdim=True) + y.sum(1) - intersection  # (B, B)
        return torch.where(union > 0, intersection / union.clamp_min(1), torch.zeros_like(union))
    # cosine; F.normalize maps an all-zero vector to zero, so its similarity is 0
    y = F.normalize(y, dim=1, eps=1e-8)  # (B, K)
    return (y @ y.T).clamp(0, 1)  # (B, B)


def sigmoid_soft_term(
    similarity: torch.Tensor, target: torch.Tensor, pair_mask: torch.Tensor, *, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Mean BCE(sigmoid(scale * similarity + bias), target) over the pairs in ``pair_mask`` (all (B, B))."""
    pair_logits = scale * similarity + bias  # (B, B)
    bce = F.binary_cross_entropy_with_logits(pair_logits, target, reduction="none")  # (B, B)
    # with no labelled pair the soft term is 0 but stays in the graph (DDP wants every parameter used)
    return (bce * pair_mask).sum() / pair_mask.sum().clamp_min(1)


def mse_soft_term(similarity: torch.Tensor, target: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
    """Mean (similarity - target)^2 over the pairs in ``pair_mask`` (all (B, B)); 0 when there is none."""
    squared = (similarity - target).square()  # (B, B)
    return (squared * pair_mask).sum() / pair_mask.sum().clamp_min(1)


def soft_ce_term(
    similarity: torch.Tensor, target: torch.Tensor, pair_mask: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """Row-wise cross-entropy between the targets normalised to sum 1 and softmax(similarity / temperature), both
    over the pairs in ``pair_mask`` (all (B, B)); the mean over rows with target mass, 0 when there is none."""
    target = target * pair_mask  # (B, B)
    mass = target.sum(1, keepdim=True)  # (B, 1)
    # a finite fill rather than -inf: a row without pairs would otherwise give NaN (0 * -inf) and NaN gradients
    logits = (similarity / temperature).masked_fill(~pair_mask, torch.finfo(similarity.dtype).min)  # (B, B)
    log_p = F.log_softmax(logits, dim=1)  # (B, B)
    cross_entropy = -(target / mass.clamp_min(1e-12) * log_p).sum(1)  # (B,), 0 for rows without mass
    has_mass = (mass.squeeze(1) > 0).float()  # (B,)
    return (cross_entropy * has_mass).sum() / has_mass.sum().clamp_min(1)


class SoftConLoss(nn.Module):
    """Instance InfoNCE + lambda_soft * label-guided soft term (formulas in the module docstring).

    Args:
        temperature: InfoNCE temperature tau (also the softmax temperature of the "soft_ce" form).
        lambda_soft: weight of the soft term; 0 gives pure InfoNCE.
        label_similarity: "cosine" (multi-hot), "jaccard" (multi-hot) or "fractions" (class fractions).
        soft_loss: form of the soft term: "sigmoid" (BCE with learnable scale and bias), "mse" or "soft_ce".
        init_scale: initial value of the sigmoid scale (stored as its log, learnable).
        init_bias: initial value of the sigmoid bias (learnable).

    Raises:
        ValueError: an unknown label_similarity or soft_loss, or a temperature <= 0.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        lambda_soft: float = 1.0,
        label_similarity: LabelSimilarity = "cosine",
        soft_loss: SoftLoss = "sigmoid",
        init_scale: float = 10.0,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if label_similarity not in LABEL_SIMILARITIES:
            raise ValueError(f"label_similarity {label_similarity!r} is not one of {LABEL_SIMILARITIES}")
        if soft_loss not in SOFT_LOSSES:
            raise ValueError(f"soft_loss {soft_loss!r} is not one of {SOFT_LOSSES}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.lambda_soft = lambda_soft
        self.label_similarity = label_similarity
        self.soft_loss = soft_loss
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(
        self,
        z: torch.Tensor,
        z_teacher: torch.Tensor,
        labels: torch.Tensor,
        labelled: torch.Tensor,
        fractions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for a batch.

        Args:
            z: student embeddings (B, D), L2-normalised.
            z_teacher: teacher embeddings of the other view (B, D), L2-normalised.
            labels: multi-hot labels (B, K).
            labelled: (B,) bool, False for scenes without labels.
            fractions: class fractions (B, K); required when label_similarity is "fractions".

        Returns:
            {"loss", "instance", "soft"}: scalar tensors; "loss" carries the gradient.
        """
        z = z.float()
        z_teacher = z_teacher.float()
        B = z.shape[0]
        similarity = z @ z_teacher.T  # (B, B) cosine, student rows x teacher columns
        targets = torch.arange(B, device=z.device)

        logits = similarity / self.temperature  # (B, B)
        instance = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

        if self.label_similarity == "fractions":
            if fractions is None:
                raise ValueError("label_similarity='fractions' needs the fractions tensor")
            target = label_similarity(fractions, kind="fractions")  # (B, B)
        else:
            target = label_similarity(labels, kind=self.label_similarity)  # (B, B)
        labelled = labelled.bool()
        pair_mask = labelled[:, None] & labelled[None, :]  # (B, B)
        if self.lambda_soft == 0:
            # hard-contrastive baseline: the soft term is only logged, so it costs no backward pass; the
            # scale and bias stay in the graph with a zero gradient (DDP wants every parameter used)
            with torch.no_grad():
                soft = self.soft_term(similarity, target, pair_mask)
            loss = instance + 0.0 * (self.log_scale + self.bias)
        else:
            soft = self.soft_term(similarity, target, pair_mask)
            loss = instance + self.lambda_soft * soft
            if self.soft_loss != "sigmoid":  # scale and bias unused: in the graph with a zero gradient, as above
                loss = loss + 0.0 * (self.log_scale + self.bias)
        return {"loss": loss, "instance": instance.detach(), "soft": soft.detach()}

    def soft_term(self, similarity: torch.Tensor, target: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """The soft term of the configured form over the pairs in ``pair_mask`` (all (B, B))."""
        if self.soft_loss == "mse":
            return mse_soft_term(similarity, target, pair_mask)
        if self.soft_loss == "soft_ce":
            return soft_ce_term(similarity, target, pair_mask, temperature=self.temperature)
        return sigmoid_soft_term(similarity, target, pair_mask, scale=self.log_scale.exp(), bias=self.bias)


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Supervised reference objective: mean binary cross-entropy of (B, K) logits against the multi-hot
    labels, over the labelled scenes and all classes (0, still in the graph, when none is labelled).

    This is the "supervised multi-label head" baseline of ``TrainConfig.objective="supervised"``: a linear
    classifier on the encoder features, trained on the same store and schedule as SoftCon, to tell how
    much of SoftCon's quality the labels alone would give.
    """
    mask = labelled.bool()[:, None].expand_as(logits)  # (B, K)
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")  # (B, K)
    return (bce * mask).sum() / mask.sum().clamp_min(1)
