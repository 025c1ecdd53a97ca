"""Draft losses: against a direct full-vocabulary reference, chunking, masking, alignment, weights."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from clover.model.layers import RMSNorm
from clover.model.losses import FIELDS, Metrics, clover_loss, eagle_loss, target_from_prenorm

N, B, L, H, V = 4, 2, 11, 16, 37
CFG = {"regression_weight": 10.0, "distill_weight": 1.0, "decay_coefficient": 0.7, "heads_coefficient": 1.0}


def ns(cfg: dict) -> SimpleNamespace:
    """A config object as the drafts pass it (attribute access)."""
    return SimpleNamespace(**cfg)


def data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    preds = torch.randn(N, B, L, H, generator=gen)
    target = torch.randn(B, L, H, generator=gen)
    weight = torch.randn(V, H, generator=gen)
    mask = (torch.rand(B, L, generator=gen) > 0.3).float()
    return preds, target, weight, mask


def reference(preds, target, weight, mask, cfg, alignment):
    """The loss written out per head over all positions with full [B, L, V] logits (denominator max(sum, 1))."""
    total, heads = 0.0, []
    length = target.shape[1]
    for i in range(preds.shape[0]):
        p, y = preds[i][:, :length - i], target[:, i:]
        offset = i + 2 if alignment == "predicted" else i
        m = F.pad(mask[:, offset:], (0, max(0, offset - i)))[:, :length - i]
        d = m.sum().clamp(min=1)
        lv = (m * F.smooth_l1_loss(p, y, reduction="none").mean(-1)).sum() / d
        lp = -(m * (F.softmax(y @ weight.T, -1) * F.log_softmax(p @ weight.T, -1)).sum(-1)).sum() / d
        heads.append((lv, lp, m.sum()))
        total = total + (cfg["regression_weight"] * lv + cfg["distill_weight"] * lp) * cfg["decay_coefficient"] ** i \
            * cfg["heads_coefficient"]
    return total, heads


@pytest.mark.parametrize("alignment", ["predicted", "eagle"])
@pytest.mark.parametrize("chunk_size", [1, 3, 10_000])
def test_matches_full_vocabulary_reference(alignment, chunk_size):
    preds, target, weight, mask = data()
    cfg = {**CFG, "heads_coefficient": 1.5}
    mine = preds.clone().requires_grad_()
    loss, metrics = clover_loss(mine, target, weight, mask, ns(cfg), mask_alignment=alignment, chunk_size=chunk_size)
    loss.backward()
    ref_preds = preds.clone().requires_grad_()
    ref, heads = reference(ref_preds, target, weight, mask, cfg, alignment)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.grad, ref_preds.grad, rtol=1e-4, atol=1e-6)
    for i, (lv, lp, count) in enumerate(heads):
        torch.testing.assert_close(metrics.mean("vloss")[i], lv, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics.mean("ploss")[i], lp, rtol=1e-5, atol=1e-6)
        assert metrics["count"][i] == count
        assert metrics["vloss_sum"][i] == pytest.approx(float(lv.detach() * count.clamp(min=1)), rel=1e-5)


def test_head_weights_decay():
    preds, target, weight, mask = data(1)
    _, metrics = clover_loss(preds, target, weight, mask, ns(CFG))
    total = 0.0
    for i in range(N):
        expected = (10 * metrics.mean("vloss")[i] + metrics.mean("ploss")[i]) * 0.7 ** i
        torch.testing.assert_close(metrics["loss"][i], expected)
        total += metrics["loss"][i]
    torch.testing.assert_close(metrics["loss"].sum(), total)


def test_perfect_predictions():
    _, target, weight, mask = data(2)
    preds = torch.stack([F.pad(target[:, i:], (0, 0, 0, i)) for i in range(N)])  # head i at t = target[t + i]
    _, metrics = clover_loss(preds, target, weight, mask, ns(CFG))
    target_mask = F.pad(mask[:, 2:], (0, 2))
    for i in range(N):
        assert metrics.mean("vloss")[i] == 0
        m = target_mask[:, i:]
        q = F.softmax(target[:, i:] @ weight.T, -1)
        entropy = -(q * q.log()).sum(-1)
        torch.testing.assert_close(metrics.mean("ploss")[i], (m * entropy).sum() / m.sum())
        for k in (1, 2, 3):
            assert metrics.accuracy(k)[i] == pytest.approx(1.0)


def test_masked_positions_contribute_nothing():
    preds, target, weight, mask = data(3)
    loss, _ = clover_loss(preds, target, weight, mask, ns(CFG))
    garbage = preds.clone()
    target_mask = F.pad(mask[:, 2:], (0, 2))
    for i in range(N):  # overwrite every (head, position) whose predicted token is masked out
        m = F.pad(target_mask[:, i:], (0, i))
        garbage[i][m == 0] = 1e3
    garbage.requires_grad_()
    loss2, _ = clover_loss(garbage, target, weight, mask, ns(CFG))
    torch.testing.assert_close(loss2, loss)
    loss2.backward()
    assert torch.all(garbage.grad[garbage.detach() == 1e3] == 0)


@pytest.mark.parametrize("alignment,first_valid", [("predicted", 2), ("eagle", 0)])
def test_mask_alignment(alignment, first_valid):
    """A single marked token at index k is a target of head i at t = k - 2 - i ("predicted", i.e. the position
    whose head-i logits predict x_k) or at t = k - i ("eagle", the original convention)."""
    preds, target, weight, _ = data(4)
    k = 5
    mask = torch.zeros(B, L)
    mask[0, k] = 1
    _, metrics = clover_loss(preds, target, weight, mask, ns(CFG), mask_alignment=alignment)
    counts = [float(metrics["count"][i]) for i in range(N)]
    assert counts == [1.0 if k - first_valid - i >= 0 else 0.0 for i in range(N)]
    one_head = preds.clone()
    t = k - first_valid  # head 0: only row 0 at t matters
    one_head[0, 0, :t] += 5
    one_head[0, 0, t + 1:] += 5
    moved = clover_loss(one_head, target, weight, mask, ns(CFG), mask_alignment=alignment)[1]
    torch.testing.assert_close(moved["loss"][0], metrics["loss"][0])


def test_empty_mask_gives_zero_loss_and_gradient():
    preds, target, weight, _ = data(5)
    preds.requires_grad_()
    loss, metrics = clover_loss(preds, target, weight, torch.zeros(B, L), ns(CFG))
    loss.backward()
    assert loss.item() == 0 and metrics["count"][0] == 0 and metrics.accuracy(1)[0] == 0
    assert torch.all(preds.grad == 0)


def test_no_grad_evaluation_matches_training_values():
    preds, target, weight, mask = data(6)
    train_loss, train_metrics = clover_loss(preds.clone().requires_grad_(), target, weight, mask, ns(CFG))
    with torch.no_grad():
        eval_loss, eval_metrics = clover_loss(preds, target, weight, mask, ns(CFG))
    torch.testing.assert_close(eval_loss, train_loss.detach())
    torch.testing.assert_close(eval_metrics.sums, train_metrics.sums)


def test_eagle_loss():
    preds, target, weight, mask = data(7)
    cfg = {"regression_weight": 1.0, "distill_weight": 0.1}
    pred = preds[0].clone().requires_grad_()
    loss, metrics = eagle_loss(pred, target, weight, mask, ns(cfg), chunk_size=4)
    ref_pred = preds[0].clone().requires_grad_()
    ref, ((lv, lp, _),) = reference(ref_pred[None], target, weight, mask, {**cfg, "decay_coefficient": 1.0,
                                                                         "heads_coefficient": 1.0}, "predicted")
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(loss, lv + 0.1 * lp)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(pred.grad, ref_pred.grad, rtol=1e-4, atol=1e-6)
    assert metrics.sums.shape == (1, len(FIELDS)) and metrics.summary().keys() == {"loss", "top1_0", "top2_0", "top3_0"}


def test_target_from_prenorm_is_the_final_norm():
    norm = RMSNorm(H, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(B, L, H) * 3
    torch.testing.assert_close(target_from_prenorm(x, norm.weight.detach(), 1e-5), norm(x).detach(), rtol=0, atol=0)


def test_draft_vocabulary_matches_restricted_reference():
    """With a draft vocabulary the heads' distributions and the renormalised teacher live on those tokens only; the
    top-k metrics compare with the teacher's argmax over the whole vocabulary."""
    preds, target, weight, mask = data(8)
    vocab = torch.tensor([0, 3, 4, 9, 10, 17, 20, 21, 30, 36])
    mine = preds.clone().requires_grad_()
    loss, metrics = clover_loss(mine, target, weight, mask, ns(CFG), chunk_size=3, draft_vocab=vocab)
    loss.backward()
    ref_preds = preds.clone().requires_grad_()
    ref, heads = reference(ref_preds, target, weight[vocab], mask, CFG, "predicted")  # W restricted = the subset
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.grad, ref_preds.grad, rtol=1e-4, atol=1e-6)
    target_mask = F.pad(mask[:, 2:], (0, 2))
    for i, (_, lp, count) in enumerate(heads):
        torch.testing.assert_close(metrics.mean("ploss")[i], lp, rtol=1e-5, atol=1e-6)
        m = target_mask[:, i:].bool()
        teacher = (target[:, i:] @ weight.T).argmax(-1)[m]
        drafted = vocab[(preds[i][:, :L - i] @ weight[vocab].T).argmax(-1)][m]
        assert metrics["top1_correct"][i] == (teacher == drafted).sum()
    # a teacher whose argmax is outside the vocabulary is a miss even for perfect predictions
    perfect = torch.stack([F.pad(target[:, i:], (0, 0, 0, i)) for i in range(N)])
    _, metrics = clover_loss(perfect, target, weight, mask, ns(CFG), draft_vocab=vocab)
    outside = ~torch.isin((target @ weight.T).argmax(-1), vocab)
    hits = (target_mask.bool() & ~outside).sum()
    assert metrics["top3_correct"][0] == hits < target_mask.sum()


def test_metrics_add_up_across_batches_and_survive_a_reduction():
    """Summed metrics of two batches equal the metrics of both batches at once; a flat vector round trip (what the
    trainer reduces across processes) keeps every field."""
    preds, target, weight, mask = data(9)
    _, both = clover_loss(preds, target, weight, mask, ns(CFG))
    halves = [clover_loss(preds[:, b:b + 1], target[b:b + 1], weight, mask[b:b + 1], ns(CFG))[1] for b in range(B)]
    total = Metrics.zeros(N) + halves[0] + halves[1]
    for field in ("count", "vloss_sum", "ploss_sum", "top1_correct", "top2_correct", "top3_correct"):
        torch.testing.assert_close(total[field], both[field], rtol=1e-5, atol=1e-5)
    assert total.batches == 2
    back = Metrics.from_vector(total.vector(), N)
    torch.testing.assert_close(back.sums, total.sums)
    assert back.batches == 2 and back.summary("test_") == total.summary("test_")
