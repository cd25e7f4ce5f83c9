"""End-to-end DTI/TI training on the tiny SD and SDXL models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dti_fast.data import Concept
from dti_fast.demo import demo_images_dir
from dti_fast.io import load_safetensors, load_torch
from dti_fast.train import TrainConfig, train

# Exported DTI vectors are m* * v with v retracted in fp32: their norm is m* to
# fp32 rounding (~1e-7 relative); 1e-5 leaves room for the sum in the norm.
NORM_RTOL = 1e-5


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from dti_fast.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "sd", family="sd")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from dti_fast.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "sdxl", family="sdxl")


def _concepts(*names: str, **overrides) -> list[Concept]:
    inits = {"dog": "dog", "clock": "clock", "backpack": "red backpack", "cat2": "cat"}
    return [Concept(name=n, images=demo_images_dir() / n, init=inits[n], **overrides) for n in names]


def _config(model: Path, out: Path, names=("dog", "backpack"), **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        output_dir=out,
        concepts=_concepts(*names),
        steps=3,
        batch_size=1,
        resolution=64,
        checkpoint_every=100,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_sd_dti_exports_load_in_diffusers_with_norm_mstar(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = train(_config(tiny_sd, tmp_path / "out"))
    m_star = result.scales[0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    for name, folder in result.concept_dirs.items():
        vectors = result.vectors[name][0]
        norms = torch.linalg.vector_norm(vectors, dim=-1)
        torch.testing.assert_close(norms, torch.full_like(norms, m_star), rtol=NORM_RTOL, atol=0)
        saved = load_safetensors(folder / "learned_embeds.safetensors")
        placeholder = f"<{name}>"
        assert list(saved) == [placeholder]
        torch.testing.assert_close(saved[placeholder], vectors, rtol=0, atol=0)
        pipe.load_textual_inversion(str(folder / "learned_embeds.safetensors"))
        tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, vectors.shape[0])]
        ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
        loaded = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
        torch.testing.assert_close(loaded, vectors, rtol=0, atol=0)
        a1111 = load_torch(folder / f"{name}-dti.pt")
        torch.testing.assert_close(a1111["string_to_param"]["*"], vectors, rtol=0, atol=0)
    # Training moved the directions away from the initializer's.
    init = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(["dog</w>"])][0]
    cos = torch.nn.functional.cosine_similarity(result.vectors["dog"][0][0], init.detach(), dim=0)
    assert float(cos) < 1 - 1e-4
    # "red backpack" tokenizes to two pieces: two vectors.
    assert result.vectors["backpack"][0].shape[0] == 2
    assert result.vectors["dog"][0].shape[0] == 1


def test_a1111_file_loads_through_diffusers(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = train(_config(tiny_sd, tmp_path / "out", names=("dog",), steps=1))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(result.concept_dirs["dog"] / "dog-dti.pt"), token="<a1111-dog>")
    tid = pipe.tokenizer.convert_tokens_to_ids("<a1111-dog>")
    torch.testing.assert_close(
        pipe.text_encoder.get_input_embeddings().weight[tid].detach(), result.vectors["dog"][0][0], rtol=0, atol=0
    )


def test_sdxl_two_encoders_export_and_load(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    result = train(_config(tiny_sdxl, tmp_path / "out", names=("dog", "backpack")))
    assert len(result.scales) == 2 and result.scales[0] != result.scales[1]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    for name, folder in result.concept_dirs.items():
        v1, v2 = result.vectors[name]
        assert v1.shape[-1] != v2.shape[-1]  # the tiny encoders have different widths, as real SDXL's do
        for v, s in ((v1, result.scales[0]), (v2, result.scales[1])):
            n = torch.linalg.vector_norm(v, dim=-1)
            torch.testing.assert_close(n, torch.full_like(n, s), rtol=NORM_RTOL, atol=0)
        placeholder = f"<{name}>"
        pipe.load_textual_inversion(
            str(folder / "learned_embeds.safetensors"),
            token=placeholder,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
        )
        pipe.load_textual_inversion(
            str(folder / "learned_embeds_2.safetensors"),
            token=placeholder,
            text_encoder=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer_2,
        )
        ids1 = pipe.tokenizer.convert_tokens_to_ids([placeholder])
        ids2 = pipe.tokenizer_2.convert_tokens_to_ids([placeholder])
        torch.testing.assert_close(
            pipe.text_encoder.get_input_embeddings().weight[ids1][0].detach(), v1[0], rtol=0, atol=0
        )
        torch.testing.assert_close(
            pipe.text_encoder_2.get_input_embeddings().weight[ids2][0].detach(), v2[0], rtol=0, atol=0
        )
        a1111 = load_safetensors(folder / f"{name}-dti.safetensors")
        torch.testing.assert_close(a1111["clip_l"], v1, rtol=0, atol=0)
        torch.testing.assert_close(a1111["clip_g"], v2, rtol=0, atol=0)


def test_ti_norms_grow_while_dti_norms_stay(tiny_sd, tmp_path):
    from dti_fast.models import load_model_parts

    parts = load_model_parts(str(tiny_sd))
    table = parts.text_encoders[0].get_input_embeddings().weight.detach()
    init_norm = float(table[parts.tokenizers[0]("dog", add_special_tokens=False)["input_ids"][0]].norm())
    ti = train(_config(tiny_sd, tmp_path / "ti", names=("dog",), method="ti", steps=8, export_ti_rescaled=True))
    dti = train(_config(tiny_sd, tmp_path / "dti", names=("dog",), steps=8))
    ti_norm = float(ti.vectors["dog"][0].norm(dim=-1).mean())
    dti_norm = float(dti.vectors["dog"][0].norm(dim=-1).mean())
    assert ti_norm > 1.25 * init_norm, (ti_norm, init_norm)  # measured: 0.103 -> 0.150 in 8 steps
    assert dti_norm == pytest.approx(dti.scales[0], rel=NORM_RTOL)
    rescaled = load_safetensors(ti.concept_dirs["dog"] / "rescaled" / "learned_embeds.safetensors")["<dog>"]
    torch.testing.assert_close(rescaled.norm(dim=-1), torch.full((1,), dti.scales[0]), rtol=NORM_RTOL, atol=0)


def test_seeded_runs_repeat_and_resume_matches_uninterrupted(tiny_sd, tmp_path):
    full = train(_config(tiny_sd, tmp_path / "full", steps=4, checkpoint_every=2, keep_checkpoints=10))
    again = train(_config(tiny_sd, tmp_path / "again", steps=4, checkpoint_every=2, keep_checkpoints=10))
    for name in full.vectors:
        torch.testing.assert_close(again.vectors[name][0], full.vectors[name][0], rtol=0, atol=0)
    # A job killed after step 2: only the step-2 checkpoint exists; --resume finishes it.
    killed = tmp_path / "killed" / "checkpoints"
    killed.mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "step-00000002.safetensors", killed)
    resumed = train(_config(tiny_sd, tmp_path / "killed", steps=4, checkpoint_every=2, resume=True))
    assert resumed.job_steps == 4 and resumed.samples == 2 * 2  # two concepts x two remaining steps
    for name in full.vectors:
        torch.testing.assert_close(resumed.vectors[name][0], full.vectors[name][0], rtol=0, atol=0)


def test_resume_refuses_a_different_job(tiny_sd, tmp_path):
    train(_config(tiny_sd, tmp_path / "out", steps=2, checkpoint_every=1))
    with pytest.raises(ValueError, match="different job"):
        train(_config(tiny_sd, tmp_path / "out", steps=2, kappa=0.5, resume=True))


def test_concept_in_a_mixed_job_trains_as_alone(tiny_sd, tmp_path):
    """Per-concept generators and per-concept loss means: batch-mates do not change a concept's path."""
    alone = train(_config(tiny_sd, tmp_path / "alone", names=("dog",), steps=3))
    mixed = train(_config(tiny_sd, tmp_path / "mixed", names=("dog", "clock", "backpack"), steps=3))
    # Only float rounding of differently-sized batches separates them.
    torch.testing.assert_close(mixed.vectors["dog"][0], alone.vectors["dog"][0], rtol=0, atol=1e-4)


def test_max_batch_makes_concepts_take_turns_with_own_step_counts(tiny_sd, tmp_path):
    cfg = _config(tiny_sd, tmp_path / "out", names=("dog", "clock", "backpack"), steps=2, max_batch=2)
    cfg.concepts[0].steps = 4
    result = train(cfg)
    info = {n: __import__("json").loads((d / "concept.json").read_text()) for n, d in result.concept_dirs.items()}
    assert info["dog"]["steps"] == 4 and info["clock"]["steps"] == 2 and info["backpack"]["steps"] == 2
    assert result.samples == 8  # 4 + 2 + 2 concept-steps of one image each


def test_validation_grid_written(tiny_sd, tmp_path):
    from PIL import Image

    result = train(
        _config(
            tiny_sd,
            tmp_path / "out",
            names=("dog",),
            steps=1,
            validation_prompts=["a photo of {}", "{} on the beach"],
            validation_inference_steps=2,
        )
    )
    grid = Image.open(result.concept_dirs["dog"] / "samples.png")
    assert grid.size == (128, 64)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: setattr(c.concepts[0], "images", Path("/nonexistent/photos")), "does not exist"),
        (lambda c: setattr(c, "model", "/nonexistent/model"), "nonexistent/model"),
        (lambda c: setattr(c, "steps", 0), "steps must be a positive integer"),
        (lambda c: setattr(c, "lr", -1.0), "lr must be positive"),
        (lambda c: setattr(c.concepts[1], "placeholder", "<dog>"), "used by two concepts"),
        (lambda c: setattr(c.concepts[0], "placeholder", "dog"), "already in the tokenizer's vocabulary"),
    ],
)
def test_bad_input_refused_before_training(tiny_sd, tmp_path, mutate, match, monkeypatch):
    from dti_fast.train import TrainingJob

    cfg = _config(tiny_sd, tmp_path / "out")
    mutate(cfg)
    calls = []
    monkeypatch.setattr(TrainingJob, "step", lambda self: calls.append(1))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train(cfg)
    assert not calls


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_job_loads_each_tokenizer_once_and_trains_with_the_tokenizers_preflight_checked(
    tiny_sd, tiny_sdxl, tmp_path, monkeypatch, family
):
    """train(): preflight loads the tokenizers to check the job before any weights; the job reuses them (one
    load each, about 0.15 s apiece for CLIP's BPE tables on a 2-core CPU) and they end holding the placeholders."""
    from transformers import CLIPTokenizer

    from dti_fast.train import TrainingJob

    loaded, jobs = [], []
    real_load = CLIPTokenizer.from_pretrained.__func__

    def counting_load(cls, *args, **kwargs):
        loaded.append(kwargs.get("subfolder"))
        return real_load(cls, *args, **kwargs)

    real_init = TrainingJob.__init__

    def keep(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        jobs.append(self)

    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", classmethod(counting_load))
    monkeypatch.setattr(TrainingJob, "__init__", keep)
    model = tiny_sd if family == "sd" else tiny_sdxl
    result = train(_config(model, tmp_path / "out", steps=1))
    assert loaded == (["tokenizer"] if family == "sd" else ["tokenizer", "tokenizer_2"])
    (job,) = jobs
    assert len(job.parts.tokenizers) == len(loaded)
    for tok in job.parts.tokenizers:
        assert {"<dog>", "<backpack>", "<backpack>_1"} <= set(tok.get_vocab())
    assert set(result.vectors) == {"dog", "backpack"}


def test_a_job_built_without_preflight_still_checks_its_tokens(tiny_sd, tmp_path):
    from dti_fast.data import load_concept_images
    from dti_fast.train import TrainingJob

    cfg = _config(tiny_sd, tmp_path / "out", names=("dog",))
    cfg.concepts[0].placeholder = "dog"
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        TrainingJob(cfg, [load_concept_images(c, cfg.resolution) for c in cfg.concepts])


def test_image_folder_errors(tmp_path):
    from dti_fast.data import load_concept_images

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="folder is empty"):
        load_concept_images(Concept("x", empty, "dog"), 64)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="found only: readme.txt"):
        load_concept_images(Concept("x", notes, "dog"), 64)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="a.jpg could not be read"):
        load_concept_images(Concept("x", broken, "dog"), 64)


def test_v_prediction_models_train(tiny_sd, tmp_path, monkeypatch):
    """SD 2.x-style models predict v: the scheduler config decides the target."""
    model = tmp_path / "vpred"
    shutil.copytree(tiny_sd, model)
    sched = model / "scheduler" / "scheduler_config.json"
    cfg = __import__("json").loads(sched.read_text())
    cfg["prediction_type"] = "v_prediction"
    sched.write_text(__import__("json").dumps(cfg))
    from dti_fast.train import TrainingJob

    seen = []
    original = TrainingJob.loss

    def spy(self, batch):
        seen.append(self.parts.noise_scheduler.config.prediction_type)
        return original(self, batch)

    monkeypatch.setattr(TrainingJob, "loss", spy)
    result = train(_config(model, tmp_path / "out", names=("dog",), steps=2))
    assert seen == ["v_prediction", "v_prediction"]
    assert result.skipped_steps == 0
