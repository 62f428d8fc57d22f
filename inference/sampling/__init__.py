"""Token sampling: batched greedy / temperature / top-k / top-p with counter-based draws."""

from inference.sampling.draws import DRAWS_VERSION, uniform_draws
from inference.sampling.sampler import SampledTokens, Sampler, SamplingPlan, request_seed

__all__ = ["DRAWS_VERSION", "SampledTokens", "Sampler", "SamplingPlan", "request_seed", "uniform_draws"]
