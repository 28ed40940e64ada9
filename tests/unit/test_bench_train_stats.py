"""tools/bench_train.py's interval of the ratio of medians against `scipy.stats.bootstrap` (paired
percentile bootstrap of the same statistic; another random stream, so equal within resampling
noise), and by hand where the answer is exact."""
import importlib.util
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

SPEC = importlib.util.spec_from_file_location(
    "bench_train", Path(__file__).resolve().parents[2] / "tools" / "bench_train.py")
bench_train = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_train)


def _steps(n, ratio, seed):
    """Paired step times as the benchmark sees them: a shared drift per pair (both sides of a
    round see the same machine), independent noise per step, the framework `ratio` slower."""
    rng = random.Random(seed)
    fw, bare = [], []
    for _ in range(n):
        drift = rng.choice([1.0, 1.0, 1.3])  # a bimodal machine, as the 2-core VM is
        bare.append(drift * 40e-3 * rng.lognormvariate(0, 0.08))
        fw.append(drift * ratio * 40e-3 * rng.lognormvariate(0, 0.08))
    return fw, bare


def test_interval_matches_scipy_paired_percentile_bootstrap():
    fw, bare = _steps(300, 1.04, seed=3)
    low, high = bench_train.ratio_interval(fw, bare, resamples=4000)
    ref = stats.bootstrap((np.array(fw), np.array(bare)),
                          lambda a, b: np.median(a) / np.median(b), paired=True,
                          vectorized=False, n_resamples=4000, method="percentile",
                          confidence_level=0.95, random_state=np.random.default_rng(0))
    print((low, high), ref.confidence_interval)
    assert low == pytest.approx(ref.confidence_interval.low, abs=3e-3)
    assert high == pytest.approx(ref.confidence_interval.high, abs=3e-3)
    point = statistics.median(fw) / statistics.median(bare)
    assert low < point < high and high - low < 0.05


def test_interval_by_hand():
    # every framework step exactly 1.1x its bare partner: every resample gives 1.1
    bare = [0.01 * (1 + i % 7) for i in range(50)]
    low, high = bench_train.ratio_interval([1.1 * b for b in bare], bare, resamples=200)
    assert low == pytest.approx(1.1, rel=1e-12) and high == pytest.approx(1.1, rel=1e-12)
    with pytest.raises(ValueError, match="equally long"):
        bench_train.ratio_interval([1.0], [1.0, 2.0])
