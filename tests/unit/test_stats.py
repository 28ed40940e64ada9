"""Routing statistics against hand computations."""
import math

import torch

from megatron_selfroute.moe.stats import routing_metrics


def test_metrics_by_hand():
    counts = torch.tensor([[5, 5, 0, 0], [1, 1, 1, 1], [10, 0, 0, 0]])
    m = routing_metrics(counts, torch.tensor([0, 2, 5]))
    assert abs(m["normalized_entropy"][0] - math.log(2) / math.log(4)) < 1e-12
    assert abs(m["normalized_entropy"][1] - 1.0) < 1e-12
    assert m["normalized_entropy"][2] == 0.0
    assert m["max_fraction"] == [0.5, 0.25, 1.0]
    assert m["dropped_fraction"] == [0.0, 0.5, 0.5]
    f = [0.7, 0.2, 0.1]
    h = -sum(x * math.log(x) for x in f) / math.log(3)
    got = routing_metrics(torch.tensor([[7, 2, 1]]), torch.tensor([0]))
    assert abs(got["normalized_entropy"][0] - h) < 1e-12
