"""The report's arithmetic: the intervals it puts on every number."""
from report import bootstrap_ci


def test_intervals_resample_prompts_not_samples():
    # 8 prompts of 25 samples each, every sample alike within its prompt: the evidence is 8 prompts, not 200 samples
    values, groups = [float(i % 2) for i in range(8) for _ in range(25)], [i for i in range(8) for _ in range(25)]
    low, high = bootstrap_ci(values, groups)
    assert low < 0.25 and high > 0.75
    low, high = bootstrap_ci(values)  # as if the 200 samples were independent: far too narrow for these data
    assert low > 0.35 and high < 0.65
    assert bootstrap_ci([0.25] * 6, [0, 0, 1, 1, 2, 2]) == (0.25, 0.25)
