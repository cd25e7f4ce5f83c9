"""The built-in demo: the tiny model, shipped photos, DTI and TI side by side.

It trains several DreamBooth concepts concurrently in one DTI job on the tiny
random-weight SD model the project builds, then the TI baseline on the same
concepts, and prints where the outputs are and how the learned norms compare:
DTI's stay at the vocabulary's m*, TI's drift.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import torch

from .data import Concept
from .train import TrainConfig, train

__all__ = ["run_demo", "demo_concepts", "DEMO_SUBJECTS"]

# Shipped DreamBooth subjects (CC-BY 4.0 / Unsplash; see ATTRIBUTION.txt beside them).
DEMO_SUBJECTS = {
    "dog": ("dog", "dog"),
    "clock": ("clock", "clock"),
    "backpack": ("red backpack", "backpack"),
    "cat2": ("cat", "cat"),
}


def demo_images_dir() -> Path:
    """The folder of the shipped DreamBooth photos."""
    return Path(str(resources.files("dti_fast") / "assets" / "dreambooth_mini"))


def demo_concepts(names=("dog", "clock", "backpack")) -> list[Concept]:
    root = demo_images_dir()
    return [Concept(name=n, images=root / n, init=DEMO_SUBJECTS[n][0], class_noun=DEMO_SUBJECTS[n][1]) for n in names]


#: The file in a demo's --output that says the demo wrote its dti/ and ti/ folders.
DEMO_MARKER = ".dti_fast_demo"


def run_demo(output: Path = Path("dti-demo-output"), steps: int = 400, seed: int = 0, progress: bool = True) -> dict:
    """Run the demo; returns {method: TrainResult}."""
    from .testing import tiny_model_path

    output = Path(output)
    model = tiny_model_path("sd")
    print(f"dti-fast demo: tiny SD model at {model}; concepts from {demo_images_dir()}")
    results = {}
    marker = output / DEMO_MARKER
    for method in ("dti", "ti"):  # checked for both before anything is removed
        out = output / method
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not marker.is_file():
            # Only a folder an earlier demo wrote (its marker says so) is replaced: a `train` job's
            # output holds the same lock file, and its concepts are the user's work.
            raise ValueError(f"{out} holds files that the demo did not write; give the demo a new folder as --output")
    output.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by dti-fast demo: its dti/ and ti/ folders are replaced by the next demo\n")
    for method in ("dti", "ti"):
        out = output / method
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        cfg = TrainConfig(
            model=str(model),
            output_dir=out,
            concepts=demo_concepts(),
            method=method,
            steps=steps,
            batch_size=2,
            resolution=64,
            seed=seed,
            checkpoint_every=max(1, steps // 2),
            progress=progress,
            validation_prompts=["a photo of {} on the beach"] if method == "dti" else [],
            validation_inference_steps=10,
        )
        print(f"\n[{method}] training {len(cfg.concepts)} concepts concurrently, {steps} steps each ...")
        results[method] = train(cfg)
        r = results[method]
        print(f"[{method}] {r.seconds:.1f} s, {r.samples_per_second:.1f} samples/s -> {out}")
    print("\nLearned vector norms (mean over each concept's vectors):")
    print(f"  {'concept':<10} {'DTI':>8} {'TI':>8}   m* (vocabulary mean norm)")
    for name in results["dti"].vectors:
        dti = float(torch.linalg.vector_norm(results["dti"].vectors[name][0], dim=-1).mean())
        ti = float(torch.linalg.vector_norm(results["ti"].vectors[name][0], dim=-1).mean())
        print(f"  {name:<10} {dti:>8.4f} {ti:>8.4f}   {results['dti'].scales[0]:.4f}")
    print(
        f"\nOutputs: {output.resolve()}/<method>/<concept>/ (learned_embeds.safetensors for diffusers, "
        "<concept>-<method>.safetensors/.pt for A1111, ComfyUI and InvokeAI, concept.json; samples.png for DTI)"
    )
    return results
