"""The device ops an engine step dispatches outside the model forward (input uploads, token
feed, logits, sampling, routing gather and reads) do not grow with the batch: on CUDA each
is a kernel launch or a copy costing host time, so a per-request loop in the step would make
large sampled batches host-bound."""

from __future__ import annotations

from inference.request import SamplingParams
from tools.op_count import DeviceOpCounter


def _ops_per_step(make_engine, model, batch: int, monkeypatch) -> list[tuple[str, int]]:
    """(step kind, ops outside the forward) of every step serving ``batch`` sampled requests."""
    engine = make_engine(record_routing=True, max_requests=batch, num_kv_blocks=256)
    kinds = [dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=20, logprobs=2), dict()]
    for i in range(batch):
        engine.add_request(list(range(2, 12 + i % 7)),
                           SamplingParams(max_new_tokens=12 + i % 5, ignore_eos=True, seed=i, **kinds[i % 3]))
    counter = DeviceOpCounter()
    forward = type(model).forward

    def paused_forward(self, *args, **kwargs):
        with counter.paused():
            return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", paused_forward)
    per_step = []
    with counter:
        while engine.has_unfinished():
            before = counter.total
            logged = len(engine.step_log.entries)
            engine.step()
            if len(engine.step_log.entries) > logged:
                e = engine.step_log.entries[-1]
                kind = "decode" if e["prefill_requests"] == 0 else "prefill"
                per_step.append((kind, e["finished_requests"], counter.total - before))
    assert counter.ops["searchsorted"] > 0, "the sampler's ops must be counted"
    return per_step


def test_step_ops_outside_the_forward_do_not_grow_with_the_batch(make_engine, tiny_model, monkeypatch):
    small = _ops_per_step(make_engine, tiny_model, 3, monkeypatch)
    large = _ops_per_step(make_engine, tiny_model, 24, monkeypatch)
    steady = lambda steps: {ops for kind, finished, ops in steps if kind == "decode" and finished == 0}  # noqa: E731
    assert steady(small) and steady(large)
    assert steady(large) == steady(small)
    assert max(ops for _, _, ops in large) <= max(ops for _, _, ops in small) + 4
