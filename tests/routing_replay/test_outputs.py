import json

import numpy as np
import pytest

from routing_replay import RoutingMeta, expand_to_all_layers, load_routing, save_routing


def make_meta(**overrides) -> RoutingMeta:
    fields = dict(moe_layer_indices=[1, 2, 4], num_layers=6, num_experts=8, topk=2,
                  block_size=16, dtype="uint8")
    fields.update(overrides)
    return RoutingMeta(**fields)


def random_routing(rng, rows, meta) -> np.ndarray:
    shape = (rows, meta.num_moe_layers, meta.topk)
    return rng.integers(0, meta.num_experts, size=shape).astype(meta.dtype)


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    meta = make_meta(num_experts=300, dtype="int16")
    # "file" and "allow_pickle" collide with np.savez keywords; ids with dots and slashes too.
    keys = ["req-0", "file", "allow_pickle", "a.b", "batch/3", "x" * 200]
    routings = {key: random_routing(rng, int(rng.integers(0, 40)), meta) for key in keys}
    save_routing(tmp_path / "out", routings, meta)
    loaded, loaded_meta = load_routing(tmp_path / "out")
    assert loaded_meta == meta
    assert set(loaded) == set(routings)
    for key, routing in routings.items():
        assert loaded[key].dtype == routing.dtype
        np.testing.assert_array_equal(loaded[key], routing)
    assert json.loads((tmp_path / "out" / "routing_meta.json").read_text()) == meta.to_dict()


def test_meta_dict_round_trip():
    meta = make_meta()
    assert RoutingMeta.from_dict(meta.to_dict()) == meta
    assert meta.to_dict()["schema_version"] == 2


@pytest.mark.parametrize("overrides", [
    dict(moe_layer_indices=[2, 1]),
    dict(moe_layer_indices=[1, 1]),
    dict(moe_layer_indices=[1, 6]),
    dict(moe_layer_indices=[-1, 2]),
    dict(moe_layer_indices=[]),
    dict(topk=9),
    dict(dtype="float32"),
    dict(dtype="uint8", num_experts=257),
    dict(schema_version=3),
    dict(num_layers=0),
])
def test_meta_rejects_inconsistent_values(overrides):
    with pytest.raises(ValueError):
        make_meta(**overrides)


@pytest.mark.parametrize("overrides", [
    dict(moe_layer_indices=[1.0, 2]),
    dict(topk=True),
    dict(num_layers="6"),
    dict(moe_layer_indices="124"),
])
def test_meta_rejects_wrong_types(overrides):
    with pytest.raises(TypeError):
        make_meta(**overrides)


def test_from_dict_requires_every_key_and_ignores_unknown_ones():
    data = make_meta().to_dict()
    del data["topk"]
    with pytest.raises(ValueError, match="topk"):
        RoutingMeta.from_dict(data)
    # Forward compatibility (docs/SCHEMAS.md): fields added later do not break this reader.
    assert RoutingMeta.from_dict({**make_meta().to_dict(), "extra": 1}) == make_meta()


@pytest.mark.parametrize("bad", [
    np.zeros((4, 2, 2), np.uint8),        # wrong number of MoE layers
    np.zeros((4, 3, 1), np.uint8),        # wrong topk
    np.zeros((4, 3, 2), np.int32),        # wrong dtype
    np.zeros((3, 2), np.uint8),           # wrong rank
])
def test_save_rejects_arrays_that_disagree_with_meta(tmp_path, bad):
    with pytest.raises(ValueError):
        save_routing(tmp_path, {"r": bad}, make_meta())
    assert not (tmp_path / "routing.npz").exists()


def test_load_reports_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="routing.npz"):
        load_routing(tmp_path)
    save_routing(tmp_path, {}, make_meta())
    (tmp_path / "routing_meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="routing_meta.json"):
        load_routing(tmp_path)


def test_load_rejects_arrays_that_disagree_with_meta(tmp_path):
    meta = make_meta()
    save_routing(tmp_path, {"r": np.zeros((5, 3, 2), np.uint8)}, meta)
    other = make_meta(moe_layer_indices=[1, 4])  # the meta file now claims 2 MoE layers
    (tmp_path / "routing_meta.json").write_text(json.dumps(other.to_dict()))
    with pytest.raises(ValueError, match="'r'"):
        load_routing(tmp_path)


def test_load_rejects_corrupt_meta(tmp_path):
    save_routing(tmp_path, {}, make_meta())
    (tmp_path / "routing_meta.json").write_text("{not json")
    with pytest.raises(ValueError):
        load_routing(tmp_path)


@pytest.mark.parametrize("num_experts,dtype", [(8, "uint8"), (300, "int16"), (40000, "int32")])
def test_expand_fills_dense_layers_with_minus_one(num_experts, dtype):
    rng = np.random.default_rng(1)
    meta = make_meta(num_experts=num_experts, dtype=dtype)
    routing = random_routing(rng, 7, meta)
    routing[0] = 0  # expert 0 is a real id and must stay distinguishable from filler
    expanded = expand_to_all_layers(routing, meta)
    assert expanded.shape == (7, meta.num_layers, meta.topk)
    assert np.issubdtype(expanded.dtype, np.signedinteger)
    dense = [i for i in range(meta.num_layers) if i not in meta.moe_layer_indices]
    assert (expanded[:, dense, :] == -1).all()
    for j, layer in enumerate(meta.moe_layer_indices):
        np.testing.assert_array_equal(expanded[:, layer, :], routing[:, j, :])
    assert (expanded[:, meta.moe_layer_indices, :] >= 0).all()


def test_expand_rejects_wrong_shape():
    with pytest.raises(ValueError):
        expand_to_all_layers(np.zeros((2, 5, 2), np.uint8), make_meta())


def test_expand_with_zero_fill_keeps_the_meta_dtype():
    rng = np.random.default_rng(2)
    meta = make_meta()
    routing = random_routing(rng, 5, meta)
    expanded = expand_to_all_layers(routing, meta, fill=0)
    assert expanded.dtype == np.dtype(meta.dtype) and expanded.shape == (5, meta.num_layers, meta.topk)
    dense = [i for i in range(meta.num_layers) if i not in meta.moe_layer_indices]
    assert (expanded[:, dense] == 0).all()
    np.testing.assert_array_equal(expanded[:, meta.moe_layer_indices], routing)


@pytest.mark.parametrize("fill", [1, -2, True, 0.0])
def test_expand_refuses_fillers_that_are_expert_ids_or_not_ints(fill):
    meta = make_meta()
    with pytest.raises(ValueError, match="fill must be -1 or 0"):
        expand_to_all_layers(random_routing(np.random.default_rng(0), 2, meta), meta, fill=fill)
