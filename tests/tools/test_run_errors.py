"""Every documented error of tools/run_inference.py: its exit code, a message that names
the flag or file (and the numbers), and never a traceback. Runs go through the fork server
(conftest.py), so each costs milliseconds."""

from __future__ import annotations

import orjson
import pytest

from routing_replay import load_results, load_routing
from inference.sampling import SAMPLER_VERSION
from routing_replay.run_dir_schema import validate_run_dir
from routing_replay.run_layout import read_manifest, write_manifest

SMALL = ["--num-requests", "4", "--prompt-len", "8", "--output-len", "4"]


def usage_error(run, *needles: str) -> None:
    assert run.status == 2, (run.status, run.stderr)
    assert "Traceback" not in run.stderr and "run summary" not in run.stdout
    for needle in needles:
        assert needle in run.stderr, run.stderr


@pytest.mark.parametrize("args, needles", [
    (["--device", "tpu"], ["--device 'tpu'", "cpu, cuda, cuda:N or auto"]),
    (["--block-size", "1000000"], ["--block-size 1000000 exceeds the model's maximum length (2048"]),
    (["--kv-cache-memory", "100GiB"], ["not enough host memory", "KV cache 100.0 GiB", "is available",
                                       "lower --kv-cache-memory or --num-kv-blocks"]),
    (["--temperature", "nan"], ["--temperature must be a finite number"]),
    (["--temperature", "inf"], ["--temperature must be a finite number"]),
    (["--top-p", "nan"], ["--top-p must be in (0, 1]"]),
    (["--checkpoint-every", "0"], ["--checkpoint-every must be >= 1"]),
    (["--checkpoint-interval", "0"], ["--checkpoint-interval must be"]),
    (["--resume"], ["--resume needs --output-dir"]),
    (["--resume", "--overwrite", "--output-dir", "x"], ["not both"]),
])
def test_configuration_errors_exit_2(cli, args, needles):
    usage_error(cli.run(SMALL + args), *needles)


def test_cuda_without_cuda_is_a_usage_error(cli):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    usage_error(cli.run(SMALL + ["--device", "cuda"]), "CUDA is not available (use --device cpu)")


def test_dry_run_gives_the_same_verdict(cli):
    bad = cli.run(SMALL + ["--dry-run", "--kv-cache-memory", "100GiB"])
    assert bad.status == 2 and "configuration is NOT valid" in bad.stdout and "DOES NOT FIT" in bad.stdout
    good = cli.run(SMALL + ["--dry-run", "--record-routing"])
    assert good.status == 0 and "configuration is valid" in good.stdout and ": fits" in good.stdout
    assert "routing buffer" in good.stdout and "Traceback" not in good.stderr + bad.stderr


def test_kv_cache_without_room_for_any_prompt_fails_every_request(cli, tmp_path):
    run = cli.run(SMALL + ["--prompt-len", "32", "--num-kv-blocks", "1", "--output-dir", tmp_path / "out"])
    assert run.status == 3, run.stderr
    assert "0 finished, 4 failed" in run.stdout and "Traceback" not in run.stderr
    results = load_results(tmp_path / "out")
    assert len(results) == 4 and all(r["finish_reason"] == "error" for r in results)


def test_kv_cache_shorter_than_a_request_is_warned_up_front(cli):
    run = cli.run(SMALL + ["--num-kv-blocks", "1", "--block-size", "10", "--prompt-len", "4", "--output-len", "8"])
    assert run.status == 0, run.stderr
    warning = run.stderr.split("\n")[0]
    assert warning.startswith("WARNING") and "max_model_len is 10" in warning and "--num-kv-blocks" in warning


# ----------------------------------------------------------------------------- --output-dir
def test_output_dir_that_is_a_file(cli, tmp_path):
    (tmp_path / "f").write_text("x")
    usage_error(cli.run(SMALL + ["--output-dir", tmp_path / "f"]), "is a file, not a directory")
    usage_error(cli.run(SMALL + ["--output-dir", tmp_path / "f" / "sub"]), "is a file, not a directory")


def test_another_runs_directory_is_refused_then_overwritten(cli, tmp_path):
    out = tmp_path / "out"
    assert cli.run(["--record-routing", *SMALL, "--output-dir", out]).status == 0
    (out / "notes.txt").write_text("mine")
    usage_error(cli.run(SMALL + ["--num-requests", "2", "--output-dir", out]),
                "holds files of another run", "--resume", "--overwrite")
    run = cli.run(SMALL + ["--num-requests", "2", "--output-dir", out, "--overwrite"])
    assert run.status == 0, run.stderr
    assert not (out / "routing.npz").exists() and not (out / "routing_meta.json").exists()   # no mixing
    assert len(load_results(out)) == 2 and validate_run_dir(out) == []
    assert (out / "notes.txt").read_text() == "mine"     # only the run's own files are deleted


def test_resume_refuses_a_different_configuration(cli, tmp_path):
    out = tmp_path / "out"
    assert cli.run(SMALL + ["--output-dir", out]).status == 0
    usage_error(cli.run(SMALL + ["--seed", "1", "--output-dir", out, "--resume"]),
                "different configuration", "seed: 0 -> 1")
    usage_error(cli.run(SMALL + ["--temperature", "0.5", "--output-dir", out, "--resume"]),
                "sampling.temperature: 0.0 -> 0.5")
    usage_error(cli.run(SMALL + ["--output-len", "5", "--output-dir", out, "--resume"]), "workload")


def test_resume_refuses_a_sampled_run_drawn_by_another_sampler_version(cli, tmp_path):
    """Sampled tokens depend on the draw algorithm: a run whose fingerprint names another one
    (or none: written before draws were versioned) is refused, a greedy run is not asked."""
    sampled = SMALL + ["--temperature", "0.8", "--seed", "3"]
    out = tmp_path / "sampled"
    assert cli.run(sampled + ["--output-dir", out]).status == 0
    manifest = read_manifest(out)
    assert manifest["fingerprint"]["sampling"]["sampler"] == SAMPLER_VERSION
    del manifest["fingerprint"]["sampling"]["sampler"]
    write_manifest(out, manifest)
    usage_error(cli.run(sampled + ["--output-dir", out, "--resume"]), f"sampling.sampler: None -> {SAMPLER_VERSION!r}")
    greedy = tmp_path / "greedy"
    assert cli.run(SMALL + ["--output-dir", greedy]).status == 0
    assert "sampler" not in read_manifest(greedy)["fingerprint"]["sampling"]


def test_resume_of_a_directory_without_manifest(cli, tmp_path):
    out = tmp_path / "v1"
    out.mkdir()
    (out / "results.jsonl").write_text('{"id": "0"}\n')
    usage_error(cli.run(SMALL + ["--output-dir", out, "--resume"]), "has no run.json", "--overwrite")


def test_resume_of_a_complete_run_does_nothing(cli, tmp_path):
    out = tmp_path / "out"
    assert cli.run(SMALL + ["--output-dir", out]).status == 0
    before = (out / "results.jsonl").read_bytes()
    run = cli.run(SMALL + ["--output-dir", out, "--resume"])
    assert run.status == 0 and "already complete" in run.stdout
    assert (out / "results.jsonl").read_bytes() == before


def test_resume_serves_failed_requests_again(cli, tmp_path):
    """A run whose long prompt failed (KV cache too small) is resumed with a larger cache:
    only that request is served, and the run ends as if it had never failed."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in (
        {"id": "short", "prompt_token_ids": [5, 6, 7]}, {"id": "long", "prompt_token_ids": list(range(3, 40))})))
    out, ref = tmp_path / "out", tmp_path / "ref"
    base = ["--prompts-file", prompts, "--max-new-tokens", "3", "--record-routing", "--block-size", "8"]
    first = cli.run(base + ["--num-kv-blocks", "2", "--output-dir", out])
    assert first.status == 3 and "1 finished, 1 failed" in first.stdout
    again = cli.run(base + ["--num-kv-blocks", "16", "--output-dir", out, "--resume"])
    assert again.status == 0, again.stderr
    assert "1 finished, 0 failed (1 more were already on disk)" in again.stdout
    assert cli.run(base + ["--num-kv-blocks", "16", "--output-dir", ref]).status == 0
    assert [r["output_token_ids"] for r in load_results(out)] == [r["output_token_ids"] for r in load_results(ref)]
    assert validate_run_dir(out) == [] and set(load_routing(out)[0]) == {"short", "long"}


# ----------------------------------------------------------------------------- request ids
BAD_IDS = [
    (b'null', "'id' is null"),
    (b'""', "must not be empty"),
    (b'"a\\u0000b"', "control character"),
    (b'"a\\nb"', "control character"),
    (b'"tab\\there"', "control character"),
    (b'"del\\u007f"', "control character"),
    (b'"c1\\u0085"', "control character"),
    (b'"line\\u2028sep"', "control character"),
    (b'"' + b"x" * 257 + b'"', "257 characters; at most 256"),
    (b'true', "must be a string or an integer, got bool"),
    (b'1.5', "must be a string or an integer, got float"),
    (b'["a"]', "must be a string or an integer, got list"),
]


@pytest.mark.parametrize("raw_id, needle", BAD_IDS, ids=[n.split()[0] + str(i) for i, (_, n) in enumerate(BAD_IDS)])
def test_bad_request_ids_are_rejected_with_the_line_number(cli, tmp_path, raw_id, needle):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"id": "fine", "prompt_token_ids": [5]}\n\n{"id": ' + raw_id + b', "prompt_token_ids": [6]}\n')
    usage_error(cli.run(["--prompts-file", prompts, "--output-dir", tmp_path / "out"]), "line 3", needle)
    assert not (tmp_path / "out").exists()


def test_odd_ids_are_never_paths_and_load_back_unchanged(cli, tmp_path):
    ids = ["../../evil", "/abs", "a/b", "100%", "sp ace", "ünï", "x" * 256, "..", "file", "7"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b"".join(orjson.dumps({"id": i, "prompt_token_ids": [5, 6]}) + b"\n" for i in ids))
    out = tmp_path / "out"
    run = cli.run(["--prompts-file", prompts, "--max-new-tokens", "2", "--record-routing", "--output-dir", out])
    assert run.status == 0, run.stderr
    import zipfile
    names = zipfile.ZipFile(out / "routing.npz").namelist()
    assert all("/" not in n and "\\" not in n for n in names) and len(names) == len(ids)
    assert set(load_routing(out)[0]) == set(ids) and [r["id"] for r in load_results(out)] == ids
    assert validate_run_dir(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.jsonl"]   # nothing written outside


# ----------------------------------------------------------------------------- checkpoints, deps
@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, intermediate_size=48,
                                         moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                         max_position_embeddings=128, eos_token_id=1)
    path = tmp_path_factory.mktemp("ckpt")
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_is_a_clear_error(cli, hf_checkpoint, tmp_path, damage):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint, ckpt)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a tensor file" * 10, "empty": b""}[damage])
    usage_error(cli.run(SMALL + ["--hf-checkpoint", ckpt]), str(weights), "not a readable .safetensors file")


def test_missing_safetensors_names_the_extra(cli, hf_checkpoint):
    usage_error(cli.run(SMALL + ["--hf-checkpoint", hf_checkpoint], block=["safetensors"]),
                "needs the optional dependency 'safetensors'", 'pip install -e ".[hf]"')


def test_missing_transformers_for_text_prompts_names_the_extra(cli, hf_checkpoint, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "t", "prompt": "hello"}\n')
    usage_error(cli.run(["--hf-checkpoint", hf_checkpoint, "--prompts-file", prompts], block=["transformers"]),
                "line 1", 'pip install -e ".[hf]"')


def test_allocation_failure_names_the_component(monkeypatch, capsys, tmp_path):
    """When the memory check passes but the allocation still fails (here: free memory
    overstated, a KV cache beyond any address space), the error names the KV cache."""
    from tools import memory_plan, run_inference
    monkeypatch.setattr(memory_plan, "available_memory", lambda device, n=1: (1 << 62, "test"))
    with pytest.raises(SystemExit) as exit_info:
        run_inference.main(SMALL + ["--kv-cache-memory", "4000000GiB", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "KV cache: allocation failed" in err and "--kv-cache-memory" in err
    assert not (tmp_path / "out").exists()


def test_a_directory_in_use_by_another_process_is_refused(cli, tmp_path):
    """A requeued job must not write into the directory its still-running original uses."""
    from tools.output_dir import RunLock
    out = tmp_path / "out"
    with RunLock(out):
        usage_error(cli.run(SMALL + ["--output-dir", out, "--resume"]), "is in use by pid", "another directory")
    assert cli.run(SMALL + ["--output-dir", out, "--resume"]).status == 0
    assert not (out / ".run.lock").exists()


def test_resume_refuses_another_samples_per_prompt_by_name(cli, tmp_path):
    """--samples-per-prompt changes the request ids, but the refusal names the flag (not only
    "num_requests: 8 -> 12" of a run whose --num-requests did not change), also for a prompts
    file whose own ids are the samples' (the same ids, tokens and seeds: only the RL-group
    fields of the results would differ)."""
    out = tmp_path / "out"
    assert cli.run(SMALL + ["--samples-per-prompt", "2", "--output-dir", out]).status == 0
    usage_error(cli.run(SMALL + ["--samples-per-prompt", "3", "--output-dir", out, "--resume"]),
                "different configuration", "samples_per_prompt: 2 -> 3")
    usage_error(cli.run(SMALL + ["--output-dir", out, "--resume"]), "samples_per_prompt: 2 -> None")
    grouped, expanded = tmp_path / "grouped.jsonl", tmp_path / "expanded.jsonl"
    grouped.write_bytes(orjson.dumps({"id": "a", "prompt_token_ids": [5, 6, 7]}) + b"\n")
    expanded.write_bytes(b"".join(orjson.dumps({"id": f"a_{k}", "prompt_token_ids": [5, 6, 7]}) + b"\n"
                                  for k in range(2)))
    files = tmp_path / "files"
    assert cli.run(["--prompts-file", grouped, "--samples-per-prompt", "2", "--output-len", "2",
                    "--output-dir", files]).status == 0
    usage_error(cli.run(["--prompts-file", expanded, "--output-len", "2", "--output-dir", files, "--resume"]),
                "samples_per_prompt: 2 -> None")


def test_failed_samples_keep_their_group_fields(cli, tmp_path):
    """An invalid prompt fails each of its samples; their error records still name the
    prompt and sample (so a consumer sees the group is incomplete) and the run is valid."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in (
        {"id": "ok", "prompt_token_ids": [5, 6, 7]}, {"id": "bad", "prompt_token_ids": [5, 10 ** 9]})))
    out = tmp_path / "out"
    run = cli.run(["--record-routing", "--prompts-file", prompts, "--samples-per-prompt", "2", "--output-len", "2",
                   "--output-dir", out])
    assert run.status == 3, run.stderr
    results = load_results(out)
    assert [(r["id"], r["prompt_id"], r["sample_index"], r["finish_reason"] == "error") for r in results] == [
        ("ok_0", "ok", 0, False), ("ok_1", "ok", 1, False), ("bad_0", "bad", 0, True), ("bad_1", "bad", 1, True)]
    assert validate_run_dir(out) == [] and set(load_routing(out)[0]) == {"ok_0", "ok_1"}
