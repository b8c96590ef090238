"""Write the GPU presets' memory plans into docs/scale_out.md (between the plan markers), from `rlora.plan`.

python scripts/plan_doc.py          # rewrite the section
python scripts/plan_doc.py --check  # exit 1 if the document is out of date (tests/test_plan.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing rlora

DOC = REPO / "docs" / "scale_out.md"
BEGIN, END = "<!-- plan:begin (scripts/plan_doc.py writes this section) -->", "<!-- plan:end -->"
LAUNCH_BEGIN, LAUNCH_END = "<!-- plan-launch:begin (scripts/plan_doc.py writes this section) -->", "<!-- plan-launch:end -->"
LAUNCH = REPO / "configs" / "launch_8gpu_example.yaml"


def preset_nodes(path: Path) -> list[tuple[int, float]]:
    """(GPUs, GiB per GPU) of each `# plan: --gpus N --gpu-memory-gib G` line."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("# plan:"):
            args = line.split(":", 1)[1].split()
            out.append((int(args[args.index("--gpus") + 1]), float(args[args.index("--gpu-memory-gib") + 1])))
    return out


def section() -> str:
    from rlora.config import RLConfig, load_config
    from rlora.plan import gib, gpu_node, plan_run

    header = (
        "| preset | node | GPUs | micro-batch x tokens | learner: weights + grads + AdamW | activations + logits | engine (KV tokens) "
        "| peak / capacity GiB | handoff GB | step s (learn + sample) | fits |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    rows = []
    for path in sorted((REPO / "configs").glob("rl_*.yaml")):
        if "cpu" in path.name:
            continue
        cfg = load_config(RLConfig, path)
        for gpus, memory in preset_nodes(path)[:1]:  # the node the preset is sized for
            plan = plan_run(cfg, gpu_node(gpus, memory))
            d = plan.devices[0]
            lm = d.learner
            assert lm is not None
            node = "H200 141 GB" if memory > 100 else "H100 80 GB"
            t = plan.times
            rows.append(
                f"| {path.stem} | {node} | {gpus} | {min(cfg.micro_batch, cfg.prompts_per_step * cfg.group_size // plan.learners)} x {plan.seq_len} "
                f"| {gib(lm.weights)} + {gib(lm.gradients)} + {gib(lm.optimizer)} | {gib(lm.activations)} + {gib(lm.logits)} "
                f"| {gib(d.engine)} ({plan.kv_tokens}) | {gib(d.peak)} / {gib(d.capacity)} | {plan.handoff_bytes / 1e9:.3f} "
                f"| {t['step_s']:.0f} ({t['learn_s']:.0f} + {t['sample_s']:.0f}) | {'yes' if plan.fits else 'NO'} |"
            )
    return f"{BEGIN}\n{header}\n" + "\n".join(rows) + f"\n{END}"


def launch_section() -> str:
    """The launch example's arms (one learning rate each: the rate changes no byte or second) on 80 GB GPUs."""
    from rlora.experiments.launch import load_plan
    from rlora.plan import gib, gpu_node, plan_run

    plan = load_plan(LAUNCH, out="runs/plan_doc")
    rows, seen = [], set()
    for run, point in zip(plan.runs, plan.sweep.points):
        cfg = point.config
        arm = "FullFT" if cfg.is_full else f"rank {cfg.rank}"
        if arm in seen:
            continue
        seen.add(arm)
        p = plan_run(cfg, gpu_node(run.gpus, 79.6))  # type: ignore[arg-type]
        t = p.times
        hours = t["step_s"] * cfg.max_steps / 3600
        rows.append(
            f"| {arm} | {run.gpus} | {t['sample_s']:.0f} s | {t['learn_s']:.0f} s | {t['handoff_s']:.2f} s | **{t['step_s']:.0f} s** "
            f"| {hours:.1f} h | {hours * run.gpus:.1f} | {gib(p.devices[0].peak)} / {gib(p.devices[0].capacity)} |"
        )
    header = "| arm | GPUs | sample | learn | handoff | step | 200 steps | GPU-hours | GPU 0 peak / capacity GiB |\n" + "| --- " * 9 + "|"
    return f"{LAUNCH_BEGIN}\n{header}\n" + "\n".join(rows) + f"\n{LAUNCH_END}"


def render(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    text = text[:start] + section() + text[end:]
    start, end = text.index(LAUNCH_BEGIN), text.index(LAUNCH_END) + len(LAUNCH_END)
    return text[:start] + launch_section() + text[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = DOC.read_text()
    new = render(text)
    if args.check:
        if new != text:
            raise SystemExit(f"{DOC} is out of date: run python scripts/plan_doc.py")
        return
    DOC.write_text(new)


if __name__ == "__main__":
    main()
