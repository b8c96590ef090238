"""`rlora plan`: memory from the model's config alone, the pre-load refusal, and the GPU presets that fit.

The slow test measures the learner's peak on CPU (scripts/gpu_check.py, default model, LoRA and
FullFT) and holds the plan's prediction to within 20% of it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlora.config import RLConfig, load_config
from rlora.plan import GIB, PlanError, architecture, check_fits, cpu_node, gpu_node, plan_run

REPO = Path(__file__).resolve().parents[1]
GPU_PRESETS = sorted(p for p in (REPO / "configs").glob("rl_*.yaml") if "cpu" not in p.name)


def plan_lines(path: Path) -> list[list[str]]:
    """The `# plan: --gpus N --gpu-memory-gib G` lines of a preset: the nodes it is sized for."""
    return [line.split(":", 1)[1].split() for line in path.read_text().splitlines() if line.startswith("# plan:")]


@pytest.mark.parametrize(
    "model,params",
    [("meta-llama/Llama-3.1-8B", 8_030_261_248), ("meta-llama/Llama-3.2-1B", 1_235_814_400), ("Qwen/Qwen3-8B-Base", 8_190_735_360)],
)
def test_known_architectures_count_on_the_meta_device(model, params):
    arch = architecture(model)
    assert arch.params == params
    assert arch.lora_params(1, ("q_proj",)) == arch.layers * (arch.hidden + arch.heads * arch.head_dim)


def test_gpu_presets_cover_the_issue():
    names = {p.name for p in GPU_PRESETS}
    for task in ("gsm8k", "math"):
        for arm in ("lora_r1", "lora_r32", "full"):
            assert {f"rl_{task}_llama3_8b_{arm}.yaml", f"rl_{task}_llama3_8b_{arm}_h200.yaml"} <= names
    assert any("qwen3_8b" in n for n in names)


@pytest.mark.parametrize("preset", GPU_PRESETS, ids=lambda p: p.stem)
def test_every_gpu_preset_fits_its_node(preset):
    lines = plan_lines(preset)
    assert lines, f"{preset.name} has no '# plan: --gpus N --gpu-memory-gib G' line"
    cfg = load_config(RLConfig, preset)
    for args in lines:
        gpus, memory = int(args[args.index("--gpus") + 1]), float(args[args.index("--gpu-memory-gib") + 1])
        plan = check_fits(cfg, gpu_node(gpus, memory))
        assert plan.kv_tokens >= cfg.max_model_len
        if cfg.is_full:
            assert cfg.learner_parallel == "fsdp" and plan.learners == gpus


def test_the_old_8b_preset_did_not_fit_and_the_refusal_names_the_key():
    old = RLConfig(model="meta-llama/Llama-3.1-8B", rank=1, task="gsm8k", prompts_per_step=64, group_size=16, max_tokens=512, dtype="bfloat16", micro_batch=8)
    with pytest.raises(PlanError, match=r"config key 'micro_batch'.*micro_batch=4 fits"):
        check_fits(old, gpu_node(1, 79.6))
    full = dataclasses.replace(old, rank="full")
    with pytest.raises(PlanError, match=r"config key 'learner_parallel'.*learner_parallel=fsdp fits"):
        check_fits(dataclasses.replace(full, micro_batch=2, gpu_memory_utilization=0.3, fsdp_grad_reduce="micro_batch"), gpu_node(4, 79.6))


def test_engine_without_room_for_one_sequence_names_gpu_memory_utilization():
    cfg = RLConfig(model="meta-llama/Llama-3.1-8B", dtype="bfloat16", gpu_memory_utilization=0.2, micro_batch=1, max_model_len=2048)
    plan = plan_run(cfg, gpu_node(1, 79.6))
    assert plan.problems and plan.problems[0][0] == "gpu_memory_utilization"


def test_rl_refuses_before_loading_anything(tmp_path, monkeypatch, capsys):
    """An over-budget config stops before a weight loads and before the run directory exists, naming the key."""
    from rlora import cli
    from rlora.train import learner

    monkeypatch.setattr(learner, "load_policy", lambda spec: pytest.fail("weights loaded before the plan refused"))
    huge = ["device=cpu", "dtype=float32", "prompts_per_step=64", "group_size=8", "max_tokens=1000", "max_model_len=2048", "micro_batch=512"]
    with pytest.raises(SystemExit) as e:
        cli.main(["rl", *huge, f"run_dir={tmp_path / 'run'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "config key 'micro_batch'" in err and "fits" in err
    assert not (tmp_path / "run").exists()


def test_plan_command_prints_the_table():
    preset = REPO / "configs" / "rl_gsm8k_llama3_8b_full.yaml"
    out = subprocess.run([sys.executable, "-m", "rlora.cli", "plan", str(preset), "--gpus", "4"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| gpu 0 (learner rank 0 + engine) |" in out.stdout and "fits: yes" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "rlora.cli", "plan", str(preset), "learner_parallel=ddp", "--gpus", "4"], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 1 and "config key 'learner_parallel'" in bad.stdout


def test_launch_refuses_a_run_that_cannot_fit(tmp_path):
    from rlora.experiments.launch import check_memory, load_plan, make_node

    plan_file = tmp_path / "p.yaml"
    plan_file.write_text(f"kind: rl\nbase: {REPO / 'configs' / 'rl_gsm8k_llama3_8b_lora_r1.yaml'}\ngpus_per_run: 1\ngrid: {{micro_batch: [4, 64]}}\n")
    plan = load_plan(plan_file, out=tmp_path / "out")
    with pytest.raises(PlanError, match=r"run micro_batch=64: config key 'micro_batch'"):
        check_memory(plan, make_node("0-7", 0), 79.6)
    check_memory(load_plan(REPO / "configs" / "launch_8gpu_example.yaml", out=tmp_path / "x"), make_node("0-7", 0), 79.6)


def test_cpu_demo_presets_fit_this_host():
    for name in ("rl_cpu_demo_lora_r1.yaml", "rl_cpu_demo_full.yaml"):
        cfg = load_config(RLConfig, REPO / "configs" / name, ["dtype=float32"])
        plan = check_fits(cfg, cpu_node())
        assert plan.devices[0].peak < 16 * GIB


@pytest.mark.slow
def test_predicted_learner_peak_within_20_percent_of_measured_on_cpu(tmp_path, monkeypatch):
    """scripts/gpu_check.py on CPU: the default model, rank-1 LoRA and FullFT, float32, one process each,
    in processes where vLLM cannot be imported (the GPU check runs where there is none)."""
    blocker = tmp_path / "no_vllm" / "vllm"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('gpu_check must not need vLLM')\n")
    monkeypatch.setenv("PYTHONPATH", f"{blocker.parent}{os.pathsep}{REPO}")
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check

    argv = ["--device", "cpu", "--dtype", "float32", "--models", "default", "--micro-batch", "4", "--seq-len", "96", "--completion", "48"]
    results = gpu_check.main([*argv, "--json", str(tmp_path / "r.json")])
    assert [r.case.arm for r in results] == ["lora", "full"]
    for r in results:
        assert 0.8 <= r.measured_peak / r.predicted_peak <= 1.2, (
            f"{r.case.arm}: measured {r.measured_peak / GIB:.2f} GiB, plan {r.predicted_peak / GIB:.2f} GiB"
        )
    assert results[1].predicted_peak > 2 * results[0].predicted_peak  # FullFT carries gradients and AdamW state


def test_scale_out_doc_comes_from_the_planner():
    sys.path.insert(0, str(REPO / "scripts"))
    import plan_doc

    text = plan_doc.DOC.read_text()
    assert plan_doc.render(text) == text, "docs/scale_out.md is out of date: run python scripts/plan_doc.py"


def test_one_reduction_per_step_costs_a_whole_gradient_and_the_plan_says_so():
    cfg = load_config(RLConfig, REPO / "configs" / "rl_gsm8k_llama3_8b_full.yaml")
    assert cfg.fsdp_grad_reduce == "micro_batch"
    per_step = dataclasses.replace(cfg, fsdp_grad_reduce="step")
    lm = plan_run(per_step, gpu_node(4, 79.6)).devices[0].learner
    assert lm is not None and lm.gradients == 4 * architecture(cfg.model).params  # whole float32 gradients on every rank
    with pytest.raises(PlanError, match=r"config key 'fsdp_grad_reduce'.*fsdp_grad_reduce=micro_batch fits"):
        check_fits(per_step, gpu_node(4, 79.6))


def test_a_fullft_kl_penalty_plans_a_frozen_copy_and_lora_plans_none():
    for preset, extra in (("rl_cpu_demo_full.yaml", True), ("rl_cpu_demo_lora_r1.yaml", False)):
        cfg = load_config(RLConfig, REPO / "configs" / preset)
        without, with_kl = (plan_run(dataclasses.replace(cfg, kl_coef=c), gpu_node(1, 79.6)).devices[0].learner for c in (0.0, 0.1))
        assert without is not None and with_kl is not None
        assert with_kl.weights - without.weights == (4 * architecture(cfg.model).params if extra else 0), preset
