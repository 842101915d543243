import pytest
import torch

from totobench.metrics.classification import topk_accuracy, topk_correct


def test_topk_on_a_case_worked_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9],    # ranking 3, 1, 2, 0
                           [0.8, 0.1, 0.0, 0.3],    # ranking 0, 3, 1, 2
                           [0.2, 0.3, 0.4, 0.1]])   # ranking 2, 1, 0, 3
    labels = torch.tensor([1, 0, 3])                # ranks 1, 0, 3
    assert topk_correct(scores, labels, (1, 2, 3, 4)) == {1: 1, 2: 2, 3: 2, 4: 3}
    assert topk_accuracy(scores, labels, (1, 2)) == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}


def test_ties_go_to_the_lower_class_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0],
                           [1.0, 1.0, 1.0, 0.0],
                           [1.0, 1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1, 2])                # tied ranks 0, 1, 2
    assert topk_correct(scores, labels, (1, 2, 3)) == {1: 1, 2: 2, 3: 3}


def test_k_larger_than_the_number_of_classes_counts_everything():
    scores = torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    labels = torch.tensor([0, 1])
    assert topk_accuracy(scores, labels) == {"top1": 0.0, "top5": 1.0}


def test_agrees_with_torch_topk_when_there_are_no_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(500, 20, generator=g)
    labels = torch.randint(0, 20, (500,), generator=g)
    top5 = scores.topk(5, dim=1).indices
    expected = (top5 == labels[:, None]).any(1).float().mean().item()
    assert topk_accuracy(scores, labels)["top5"] == pytest.approx(expected)
    assert topk_accuracy(scores, labels)["top1"] == pytest.approx((scores.argmax(1) == labels).float().mean().item())


@pytest.mark.parametrize("scores, labels", [
    (torch.zeros(3, 4), torch.tensor([0, 1])),       # length mismatch
    (torch.zeros(2, 4), torch.tensor([0, 4])),       # label out of range
    (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),  # empty
])
def test_bad_inputs_raise(scores, labels):
    with pytest.raises(ValueError):
        topk_accuracy(scores, labels)
