"""Means and standard errors from moments that merge exactly: the 1e8-offset audit case, shards, batches."""

import torch

from ddpm_schedules.costs.evaluation import ScheduleTermsMetric
from ddpm_schedules.costs.matrix import CostMatrixMetric
from ddpm_schedules.costs.moments import batch_moments, mean_sem, merge_moments

f64 = torch.float64


def sums_and_stats(sums):
    """Every state of a `MatrixSums` and the pairs' means and standard errors made from them."""
    return (sums.moments, sums.prior_moments, sums.column_moments, sums.count, *sums.pairs_mean_sem())


def offset_values(n=200, offset=1e8, seed=0):
    return offset + torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=f64)


def test_sem_of_values_far_from_zero_is_that_of_the_values():
    x = offset_values()
    want = x.std() / 200**0.5  # 0.075 here; raw sums of squares gave 0.113
    metric = CostMatrixMetric(3)
    for chunk in x.split(7):
        metric.update(torch.stack([chunk, chunk + 1.0], 1), 2)
    sem = metric.compute().pairs_mean_sem()[1]
    torch.testing.assert_close(sem[0, 0, 2], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(sem[0, 1, 2], want, rtol=1e-6, atol=0)
    totals = ScheduleTermsMetric(1, 1)
    for chunk in x.split(13):
        totals.update(torch.zeros(len(chunk), 1, dtype=f64), chunk[:, None], torch.zeros(len(chunk), dtype=f64))
    torch.testing.assert_close(totals.compute()["sem"].reshape(-1)[0], want, rtol=1e-6, atol=0)


def test_merging_moments_in_any_grouping_equals_the_whole():
    x = offset_values(61, offset=3e7, seed=1)
    whole = batch_moments(x)
    parts = [batch_moments(p) for p in x.split([5, 1, 20, 35])]
    left = merge_moments(torch.stack(parts))
    right = merge_moments(torch.stack([merge_moments(torch.stack(parts[:2])), merge_moments(torch.stack(parts[2:]))]))
    for got in (left, right):
        torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-6)
    mean, sem = mean_sem(whole)
    assert mean == x.mean() and torch.isclose(sem, x.std() / 61**0.5, rtol=1e-9)
    empty = torch.zeros(3, dtype=f64)
    torch.testing.assert_close(merge_moments(torch.stack([empty, whole])), whole, rtol=0, atol=0)  # nothing + x = x


def test_shards_merge_like_processes_would():
    x = offset_values(40, seed=2)
    a, b, whole = CostMatrixMetric(2), CostMatrixMetric(2), CostMatrixMetric(2)
    for k, chunk in enumerate(x.split(10)):
        (a if k % 2 else b).update(chunk[:, None], 1, chunk)
        whole.update(chunk[:, None], 1, chunk)
    a.merge_state(b)  # torchmetrics applies the same reduction across processes
    for got, want in zip(sums_and_stats(a.compute()), sums_and_stats(whole.compute())):
        torch.testing.assert_close(
            got, want, rtol=1e-8, atol=0, equal_nan=True
        )  # values near 1e8: float64 keeps ~1e-8 of them
