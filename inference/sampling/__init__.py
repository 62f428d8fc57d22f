"""Token sampling: batched greedy / temperature / top-k / top-p with counter-based draws."""

from inference.sampling.draws import uniform_draws
from inference.sampling.sampler import SAMPLER_VERSION, SampledTokens, Sampler, SamplingPlan, request_seed

__all__ = ["SAMPLER_VERSION", "SampledTokens", "Sampler", "SamplingPlan", "request_seed", "uniform_draws"]
