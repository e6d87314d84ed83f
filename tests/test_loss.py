"""SoftCon loss: vectorised terms against a per-pair reference, targets, masking of unlabelled scenes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from softcon.config import TrainConfig
from softcon.models.heads import ProjectionHead
from softcon.models.loss import SOFT_LOSSES, SoftConLoss, label_similarity, multilabel_loss

torch.set_num_threads(2)


def random_batch(seed: int, B: int = 6, D: int = 8, K: int = 5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(B, K, generator=generator) < 0.5).float()
    labels[0] = 0  # an all-zero label vector
    fractions = torch.rand(B, K, generator=generator) * labels
    fractions = fractions / fractions.sum(1, keepdim=True).clamp_min(1e-8)
    return {
        "z": F.normalize(torch.randn(B, D, generator=generator), dim=1),
        "z_teacher": F.normalize(torch.randn(B, D, generator=generator), dim=1),
        "labels": labels,
        "fractions": fractions,
        "labelled": torch.tensor([True, True, False, True, True, False])[:B],
    }


def reference_loss(batch, *, temperature, lambda_soft, kind, scale, bias) -> dict[str, float]:
    """Slow per-pair version of the formula in models/loss.py."""
    z, zt, labelled = batch["z"].tolist(), batch["z_teacher"].tolist(), batch["labelled"].tolist()
    y = (batch["fractions"] if kind == "fractions" else batch["labels"]).tolist()
    B = len(z)

    def dot(a, b):
        return sum(p * q for p, q in zip(a, b, strict=True))

    def sim(a, b):
        if kind == "jaccard":
            inter = sum(1 for p, q in zip(a, b, strict=True) if p > 0 and q > 0)
            union = sum(1 for p, q in zip(a, b, strict=True) if p > 0 or q > 0)
            return inter / union if union else 0.0
        na, nb = math.sqrt(dot(a, a)), math.sqrt(dot(b, b))
        return dot(a, b) / (na * nb) if na > 0 and nb > 0 else 0.0

    s = [[dot(z[i], zt[j]) for j in range(B)] for i in range(B)]
    rows = [-s[i][i] / temperature + math.log(sum(math.exp(s[i][j] / temperature) for j in range(B))) for i in range(B)]
    cols = [-s[j][j] / temperature + math.log(sum(math.exp(s[i][j] / temperature) for i in range(B))) for j in range(B)]
    instance = 0.5 * (sum(rows) / B + sum(cols) / B)
    bce, pairs = 0.0, 0
    for i in range(B):
        for j in range(B):
            if labelled[i] and labelled[j]:
                p = 1 / (1 + math.exp(-(scale * s[i][j] + bias)))
                t = sim(y[i], y[j])
                bce += -(t * math.log(p) + (1 - t) * math.log(1 - p))
                pairs += 1
    soft = bce / pairs
    return {"loss": instance + lambda_soft * soft, "instance": instance, "soft": soft}


@pytest.mark.parametrize("kind", ["cosine", "jaccard", "fractions"])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_per_pair_reference(kind: str, seed: int) -> None:
    batch = random_batch(seed)
    loss_fn = SoftConLoss(temperature=0.2, lambda_soft=0.7, label_similarity=kind, init_scale=5.0, init_bias=-1.0)
    terms = loss_fn(batch["z"], batch["z_teacher"], batch["labels"], batch["labelled"], batch["fractions"])
    expected = reference_loss(batch, temperature=0.2, lambda_soft=0.7, kind=kind, scale=5.0, bias=-1.0)
    for name in ("loss", "instance", "soft"):
        assert terms[name].item() == pytest.approx(expected[name], rel=1e-4), name


@pytest.mark.parametrize("kind", ["cosine", "jaccard", "fractions"])
def test_identical_labels_target_one_disjoint_zero(kind: str) -> None:
    labels = torch.tensor([[1.0, 0, 1, 0], [1.0, 0, 1, 0], [0, 1.0, 0, 1]])
    target = label_similarity(labels, kind=kind)
    assert target[0, 1].item() == pytest.approx(1.0)
    assert target[0, 0].item() == pytest.approx(1.0)
    assert target[0, 2].item() == 0.0


def test_unknown_label_similarity_is_refused() -> None:
    with pytest.raises(ValueError, match="'dice' is not one of"):
        SoftConLoss(label_similarity="dice")  # type: ignore[arg-type]


def test_gradients_reach_the_encoder() -> None:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = ProjectionHead(8, 4)
    x = torch.randn(6, 3, 8, 8)
    z = head(encoder(x))
    with torch.no_grad():
        z_teacher = head(encoder(x + 0.1 * torch.randn_like(x)))
    batch = random_batch(0, D=4)
    loss_fn = SoftConLoss()
    loss_fn(z, z_teacher, batch["labels"], batch["labelled"])["loss"].backward()
    assert encoder[0].weight.grad is not None and encoder[0].weight.grad.abs().sum() > 0
    assert loss_fn.log_scale.grad is not None and loss_fn.bias.grad is not None


def test_unlabelled_scenes_contribute_only_the_instance_term() -> None:
    batch = random_batch(3)
    loss_fn = SoftConLoss(lambda_soft=1.0)
    before = loss_fn(batch["z"], batch["z_teacher"], batch["labels"], batch["labelled"])
    changed = batch["labels"].clone()
    changed[~batch["labelled"]] = 1 - changed[~batch["labelled"]]
    after = loss_fn(batch["z"], batch["z_teacher"], changed, batch["labelled"])
    assert after["loss"].item() == before["loss"].item()


@pytest.mark.parametrize("soft_loss", SOFT_LOSSES)
def test_no_labelled_scene_gives_zero_soft_term(soft_loss: str) -> None:
    batch = random_batch(4)
    z = batch["z"].clone().requires_grad_()
    terms = SoftConLoss(soft_loss=soft_loss)(z, batch["z_teacher"], batch["labels"], torch.zeros(6, dtype=torch.bool))
    terms["loss"].backward()
    assert terms["soft"].item() == 0.0
    assert terms["loss"].item() == pytest.approx(terms["instance"].item())
    assert torch.isfinite(z.grad).all()  # soft_ce's rows without pairs give no NaN


def test_lambda_zero_is_pure_infonce() -> None:
    batch = random_batch(5)
    terms = SoftConLoss(lambda_soft=0.0, temperature=0.1)(
        batch["z"], batch["z_teacher"], batch["labels"], batch["labelled"]
    )
    logits = batch["z"] @ batch["z_teacher"].T / 0.1
    targets = torch.arange(6)
    infonce = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    assert terms["loss"].item() == pytest.approx(infonce.item(), rel=1e-6)


def reference_multilabel_loss(logits: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor) -> float:
    """Slow per-element binary cross-entropy over labelled scenes and all classes."""
    total, count = 0.0, 0
    for i in range(logits.shape[0]):
        if not labelled[i]:
            continue
        for k in range(logits.shape[1]):
            p = 1 / (1 + math.exp(-logits[i, k].item()))
            y = labels[i, k].item()
            total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
            count += 1
    return total / count


@pytest.mark.parametrize("seed", [0, 1])
def test_supervised_head_loss_matches_per_element_reference(seed: int) -> None:
    batch = random_batch(seed)
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed + 10)) * 3
    got = multilabel_loss(logits, batch["labels"], batch["labelled"]).item()
    assert got == pytest.approx(reference_multilabel_loss(logits, batch["labels"], batch["labelled"]), rel=1e-5)


def test_supervised_head_loss_ignores_unlabelled_scenes() -> None:
    batch = random_batch(2)
    logits = torch.randn(6, 5, requires_grad=True)
    multilabel_loss(logits, batch["labels"], batch["labelled"]).backward()
    assert (logits.grad[~batch["labelled"]] == 0).all()
    assert (logits.grad[batch["labelled"]] != 0).any()


def test_lambda_zero_logs_the_soft_term_without_its_gradient() -> None:
    batch = random_batch(6)
    z = batch["z"].clone().requires_grad_()
    loss_fn = SoftConLoss(lambda_soft=0.0)
    terms = loss_fn(z, batch["z_teacher"], batch["labels"], batch["labelled"])
    terms["loss"].backward()
    assert terms["soft"].item() > 0  # still measured, for comparing runs
    assert loss_fn.log_scale.grad.item() == 0.0 and loss_fn.bias.grad.item() == 0.0


def test_default_soft_loss_reproduces_the_sigmoid_value() -> None:
    """The default config's loss on a fixed batch is the value the sigmoid form gave before soft_loss existed."""
    config = TrainConfig()
    loss_fn = SoftConLoss(
        temperature=config.temperature, lambda_soft=config.lambda_soft, label_similarity=config.label_similarity,
        soft_loss=config.soft_loss,
    )  # fmt: skip
    batch = random_batch(0)
    terms = loss_fn(batch["z"], batch["z_teacher"], batch["labels"], batch["labelled"])
    assert config.soft_loss == "sigmoid"
    assert terms["loss"].item() == pytest.approx(7.479748725891113, rel=1e-6)
    assert terms["instance"].item() == pytest.approx(5.804638385772705, rel=1e-6)
    assert terms["soft"].item() == pytest.approx(1.6751103401184082, rel=1e-6)


def three_scene_batch() -> dict[str, torch.Tensor]:
    """Scene 2 is unlabelled (its labels would change the soft term if they were read).

    Cosine C = z @ z_teacher.T over the labelled block: [[1, 0], [0.6, 0.8]]; cosine label similarity
    T = [[1, a], [a, 1]] with a = 1/sqrt(2).
    """
    return {
        "z": torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]),
        "z_teacher": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
        "labels": torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]),
        "labelled": torch.tensor([True, True, False]),
    }


A = 1 / math.sqrt(2)
# soft_ce at temperature 0.5, row 0: logits [2, 0], targets [1, a] / (1 + a)
_SOFT_CE_ROW_0 = (math.log1p(math.exp(-2)) + A * math.log1p(math.exp(2))) / (1 + A)
# row 1: logits [1.2, 1.6], targets [a, 1] / (1 + a); log p = logits - logsumexp(logits)
_LOGSUMEXP_ROW_1 = math.log(math.exp(1.2) + math.exp(1.6))
_SOFT_CE_ROW_1 = (A * (_LOGSUMEXP_ROW_1 - 1.2) + (_LOGSUMEXP_ROW_1 - 1.6)) / (1 + A)
HAND_SOFT_TERMS = {
    "mse": (0.0**2 + A**2 + (0.6 - A) ** 2 + 0.2**2) / 4,  # mean of (C - T)^2 over the four labelled pairs
    "soft_ce": (_SOFT_CE_ROW_0 + _SOFT_CE_ROW_1) / 2,  # row 2 (unlabelled) has no pairs
}


@pytest.mark.parametrize("soft_loss", ["mse", "soft_ce"])
def test_soft_term_matches_a_hand_computation(soft_loss: str) -> None:
    batch = three_scene_batch()
    terms = SoftConLoss(temperature=0.5, lambda_soft=0.5, soft_loss=soft_loss)(
        batch["z"], batch["z_teacher"], batch["labels"], batch["labelled"]
    )
    assert terms["soft"].item() == pytest.approx(HAND_SOFT_TERMS[soft_loss], rel=1e-6)
    assert terms["loss"].item() == pytest.approx(terms["instance"].item() + 0.5 * HAND_SOFT_TERMS[soft_loss], rel=1e-6)


@pytest.mark.parametrize("soft_loss", SOFT_LOSSES)
def test_soft_term_gradient_reaches_the_labelled_pairs_only(soft_loss: str) -> None:
    batch = random_batch(7)
    similarity = (batch["z"] @ batch["z_teacher"].T).requires_grad_()  # (B, B)
    target = label_similarity(batch["labels"])
    pair_mask = batch["labelled"][:, None] & batch["labelled"][None, :]
    SoftConLoss(soft_loss=soft_loss).soft_term(similarity, target, pair_mask).backward()
    assert (similarity.grad[~pair_mask] == 0).all()
    assert (similarity.grad[pair_mask] != 0).any()


@pytest.mark.parametrize("soft_loss", SOFT_LOSSES)
def test_every_soft_form_trains_the_embeddings(soft_loss: str) -> None:
    """The soft term adds to the embeddings' gradient; only the sigmoid form trains the scale and bias."""
    batch = random_batch(8)
    grads = {}
    for lambda_soft in (0.0, 1.0):
        z = batch["z"].clone().requires_grad_()
        loss_fn = SoftConLoss(lambda_soft=lambda_soft, soft_loss=soft_loss)
        loss_fn(z, batch["z_teacher"], batch["labels"], batch["labelled"])["loss"].backward()
        grads[lambda_soft] = z.grad
    assert torch.isfinite(grads[1.0]).all()
    assert not torch.allclose(grads[1.0], grads[0.0])
    scale_and_bias = (loss_fn.log_scale.grad.item(), loss_fn.bias.grad.item())
    assert (scale_and_bias != (0.0, 0.0)) == (soft_loss == "sigmoid")


def test_unknown_soft_loss_is_refused() -> None:
    with pytest.raises(ValueError, match=r"soft_loss 'hinge' is not one of \('sigmoid', 'mse', 'soft_ce'\)"):
        SoftConLoss(soft_loss="hinge")  # type: ignore[arg-type]
