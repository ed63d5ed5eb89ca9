"""`make bench` end to end on the tiny model with one repeat, so the benchmark code does not rot.
No timing is asserted: only that every part ran and measured something real."""

from __future__ import annotations

import json

import pytest

from bench.run import SYNC_REPEATS, TOPK, run, run_weight_sync


@pytest.mark.ray
def test_bench_runs_end_to_end(ray_cluster, tmp_path):
    # (i) with the HF layouts only: the vLLM ones are the same code with two engine starts more
    # (tests/test_vllm_adapter.py runs the vLLM adapter path)
    parts = run("tiny", 1, tmp_path, layouts=("hf, teacher actor", "hf, one engine"))
    for name in (
        "step_breakdown",
        "overhead",
        "peer_trl",
        "weight_sync",
        "memory",
        "engines",
        "scaling",
        "one_engine",
    ):
        assert json.loads((tmp_path / f"{name}.json").read_text()) == json.loads(json.dumps(parts[name]))
        assert parts[name]["machine"]["cores"] >= 1

    a = parts["step_breakdown"]
    for algo in ("opsd", "atesd"):
        stages = {k: v["median"] for k, v in a[algo].items()}
        assert stages["rollout"] > 0 and stages["teacher"] > 0 and stages["student_update"] > 0
        assert stages["weight_sync"] > 0 and stages["controller"] > 0
        assert 0 < stages["busy_union"] <= stages["step_wall"] + 1e-6
    assert all(0.1 <= alpha <= 1.0 for alpha in a["atesd_alpha"])

    b = parts["overhead"]
    assert b["distributed_tokens"]["median"] > 0 and b["single_process"]["tokens"]["median"] > 0
    assert b["ratio_distributed_over_single"] > 0

    c = parts["peer_trl"]
    assert set(c["peers"]) == {"trl_gkd", "trl_distillation"}
    for peer in c["peers"].values():
        assert peer["seconds"]["median"] > 0 and peer["tokens"]["median"] > 0
        assert peer["beside_vllm_rollout"]["ours_seconds"]["median"] > 0
        assert peer["beside_vllm_rollout"]["ratio_ours_over_peer"] > 0

    d = parts["weight_sync"]
    floors = {"ray_put_alone", "broadcast_alone"}
    assert set(d["by_transport"]) == {"object_store", "collective", "in_process_copy"} | floors
    assert all(t["gb_per_s"] > 0 for t in d["by_transport"].values())

    e = parts["memory"]["teacher_transfer"]
    rows, width, vocab = e["full_vocab"]["shape"]
    assert e[f"top{TOPK}"]["shape"] == [rows, width, TOPK]
    assert e[f"top{TOPK}"]["bytes"] < e["full_vocab"]["bytes"]
    assert e["full_vocab"]["bytes"] >= rows * width * vocab * 4
    resident = parts["memory"]["resident_bytes"]
    assert all(m["peak"] >= m["private"] > 0 and m["shared"] >= 0 for m in resident.values())

    f = parts["engines"]
    for engine in ("hf", "vllm"):
        assert (
            f["rollout_tokens_per_s"][engine]["median"] > 0 and f["teacher_scoring_s"][engine]["median"] > 0
        )
    assert f["ratio_rollout_vllm_over_hf"] > 0 and f["ratio_scoring_hf_over_vllm"] > 0

    g = parts["scaling"]
    assert len(g["shapes"]) >= 2 and (tmp_path / "scaling.png").stat().st_size > 0
    assert all(r["distributed_s"]["median"] > 0 and r["single_process_s"]["median"] > 0 for r in g["shapes"])
    assert {r["tokens"]["median"] for r in g["shapes"]} != {g["shapes"][0]["tokens"]["median"]}
    for arm in ("distributed", "single_process"):
        assert set(g["fit"][arm]) == {"prompts", "length"}
        assert all(f.keys() == {"intercept_s", "per_1k_tokens_s", "r2"} for f in g["fit"][arm].values())

    i = parts["one_engine"]["layouts"]
    assert i["hf, one engine"]["actors"] == ["rollout0", "student0"]
    assert "teacher0" in i["hf, teacher actor"]["actors"]
    assert all(
        r["sync_s"]["median"] > 0 and r["node_peak_bytes"] > 0 and r["sync_bytes"] > 0 for r in i.values()
    )
    h = json.loads((tmp_path / "sync_bytes.json").read_text())["rows"]
    assert {r["model"] for r in h} == {"smollm2_135m", "qwen3_1_7b", "qwen3_4b", "qwen3_8b"}
    delta = {r["dtype"]: r for r in json.loads((tmp_path / "sync_bytes.json").read_text())["delta"]}
    assert set(delta) == {"float32", "bfloat16"} and all(len(r["delta_share"]) == 2 for r in delta.values())
    assert all(0 < x <= 1 for r in delta.values() for x in r["delta_share"] + r["changed_share"])
    assert all(len(r["encode_s"]) == 2 and min(r["encode_s"]) > 0 for r in delta.values())

    table = (tmp_path / "README.md").read_text()
    assert "(a) Per-step breakdown" in table and "| current | opsd |" in table
    assert "(h) Delta syncs without LoRA" in table and "| current | tiny | bfloat16 |" in table
    assert "(h) Bytes per weight sync" in table and "| current | hf, one engine |" in table
    assert "| current | vllm | DistillationTrainer |" in table

    # (d) alone (--only-weight-sync) rewrites its own results and keeps the others'
    again = run_weight_sync("tiny", 1, tmp_path)["weight_sync"]
    assert json.loads((tmp_path / "weight_sync.json").read_text())["time"] == again["time"]
    assert all(t["seconds"]["n"] >= SYNC_REPEATS for t in again["by_transport"].values())
    assert json.loads((tmp_path / "scaling.json").read_text()) == json.loads(json.dumps(g))
    assert "(a) Per-step breakdown" in (tmp_path / "README.md").read_text()
