"""The carried-state causal conv equals one whole-sequence torch conv, however it is split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inference.model.recurrent import RecurrentMetadata
from inference.model.recurrent.conv1d import causal_conv1d_sequence, causal_conv1d_varlen

CHANNELS, KERNEL = 6, 4


def whole(x, weight, bias):
    """Independent reference: nn.Conv1d semantics with left padding K-1, then SiLU."""
    out = F.conv1d(x.t()[None], weight[:, None, :], bias, padding=KERNEL - 1, groups=CHANNELS)[0]
    return F.silu(out[:, : x.shape[0]]).t()


def _weights(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(CHANNELS, KERNEL, generator=gen), torch.randn(CHANNELS, generator=gen)


@pytest.mark.parametrize("splits", [[13], [1] * 13, [2, 1, 1, 5, 4], [3, 10]])
def test_any_split_equals_the_whole_sequence(splits):
    weight, bias = _weights(0)
    x = torch.randn(sum(splits), CHANNELS, generator=torch.Generator().manual_seed(1))
    states = torch.full((3, CHANNELS, KERNEL - 1), 7.0)          # garbage in every slot
    outs, start = [], 0
    for i, n in enumerate(splits):
        meta = RecurrentMetadata.build([n], [1], [i > 0])
        outs.append(causal_conv1d_varlen(x[start:start + n], states, weight, bias, meta))
        start += n
    torch.testing.assert_close(torch.cat(outs), whole(x, weight, bias))
    torch.testing.assert_close(states[1], x[-(KERNEL - 1):].t())
    assert torch.all(states[[0, 2]] == 7.0)


def test_packed_step_with_decodes_and_chunks():
    weight, bias = _weights(2)
    seqs = [torch.randn(n, CHANNELS, generator=torch.Generator().manual_seed(n)) for n in (6, 2, 9)]
    states = torch.zeros(4, CHANNELS, KERNEL - 1)
    first = [5, 1, 4]
    causal_conv1d_varlen(torch.cat([s[:n] for s, n in zip(seqs, first)]), states, weight, bias,
                         RecurrentMetadata.build(first, [2, 0, 3], [False] * 3))
    rest = [1, 1, 5]
    out = causal_conv1d_varlen(torch.cat([s[n:] for s, n in zip(seqs, first)]), states, weight, bias,
                               RecurrentMetadata.build(rest, [2, 0, 3], [True] * 3))
    for piece, s, n in zip(out.split(rest), seqs, first):
        torch.testing.assert_close(piece, whole(s, weight, bias)[n:])


def test_decode_only_step_is_batched_and_matches():
    weight, bias = _weights(3)
    x = torch.randn(3, 5, CHANNELS, generator=torch.Generator().manual_seed(4))   # 3 sequences, 5 tokens
    states = torch.randn(4, CHANNELS, KERNEL - 1)
    slots = [3, 1, 0]
    outs = []
    for t in range(5):
        meta = RecurrentMetadata.build([1, 1, 1], slots, [t > 0] * 3)
        assert meta.decode_only
        outs.append(causal_conv1d_varlen(x[:, t], states, weight, bias, meta))
    got = torch.stack(outs, dim=1)
    for r in range(3):
        torch.testing.assert_close(got[r], whole(x[r], weight, bias))


def test_no_bias_no_activation_and_bad_activation():
    weight, _ = _weights(5)
    x = torch.randn(4, CHANNELS)
    out, state = causal_conv1d_sequence(x, None, weight, None, activation=None)
    ref = F.conv1d(x.t()[None], weight[:, None, :], None, padding=KERNEL - 1, groups=CHANNELS)[0, :, :4].t()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(state, x[1:].t())
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_sequence(x, None, weight, None, activation="gelu")
