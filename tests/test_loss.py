"""SoftCon loss: vectorised terms against a per-pair reference, targets, masking of unlabelled scenes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from softcon.models.heads import ProjectionHead
from softcon.models.loss import SoftConLoss, label_similarity, multilabel_loss

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


def test_no_labelled_scene_gives_zero_soft_term() -> None:
    batch = random_batch(4)
    terms = SoftConLoss()(batch["z"], batch["z_teacher"], batch["labels"], torch.zeros(6, dtype=torch.bool))
    assert terms["soft"].item() == 0.0
    assert terms["loss"].item() == pytest.approx(terms["instance"].item())


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
