"""The SANA and Wan 2.1 families on their tiny models: the training step, norms, exports, generation, resume, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dti_fast.data import Concept
from dti_fast.demo import demo_images_dir
from dti_fast.io import load_safetensors
from dti_fast.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("sana", "wan")
NORM_RTOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dti_fast.testing import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-flow")
    return {f: make_tiny_model(root / f, family=f) for f in FAMILIES}


def _config(model: Path, out: Path, names=("dog", "backpack"), **kw) -> TrainConfig:
    inits = {"dog": "dog", "backpack": "red backpack"}
    base = dict(
        model=str(model),
        output_dir=out,
        concepts=[Concept(name=n, images=demo_images_dir() / n, init=inits[n]) for n in names],
        steps=2,
        batch_size=2,
        resolution=64,
        checkpoint_every=100,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _raw_table_norms(model: Path) -> torch.Tensor:
    """Row norms of the text encoder's input table, read from the weights file (before Gemma's sqrt(d))."""
    weights = load_safetensors(model / "text_encoder" / "model.safetensors")
    key = next(k for k in weights if k.endswith(("embed_tokens.weight", "shared.weight")))
    n = torch.linalg.vector_norm(weights[key].float(), dim=-1)
    return n[n > 0]


def test_detection_and_required_parts(tiny, tmp_path):
    from dti_fast.models import detect_family, resolve_source

    for fam, folder in tiny.items():
        assert detect_family(folder) == fam
        assert resolve_source(str(folder), None, None).family == fam
    # A Wan 2.2 two-expert layout is refused by name.
    two = tmp_path / "wan22"
    shutil.copytree(tiny["wan"], two)
    index = json.loads((two / "model_index.json").read_text())
    index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    (two / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="two-expert WanPipeline"):
        detect_family(two)


def test_family_from_a_hub_model_index():
    """What resolve_source reads for a hub id: model_index.json's _class_name."""
    from dti_fast.models import _family_from_index

    part = ["diffusers", "X"]
    sana = {"_class_name": "SanaPipeline", "transformer": part, "text_encoder": ["transformers", "Gemma2Model"]}
    wan = {"_class_name": "WanPipeline", "transformer": part, "transformer_2": [None, None], "vae": part}
    assert _family_from_index(sana, "'Efficient-Large-Model/Sana_1600M_1024px_diffusers'") == "sana"
    assert _family_from_index(wan, "'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'") == "wan"
    with pytest.raises(ValueError, match="PixArtSigmaPipeline pipeline, not a UNet one.*SanaPipeline"):
        _family_from_index({"_class_name": "PixArtSigmaPipeline", "transformer": part}, "'x'")


@pytest.mark.parametrize("family, text_cache", [("sana", "auto"), ("sana", True), ("wan", "auto")])
def test_step_loss_and_row_gradients_equal_a_plain_forward(tiny, tmp_path, family, text_cache):
    """The trainer's loss and row gradients equal a forward written out here with diffusers' own modules,
    and its conditioning equals what the family's pipeline computes for the same prompts."""
    import diffusers

    from dti_fast.data import load_concept_images
    from dti_fast.models import pipeline_from_parts
    from dti_fast.train import TrainingJob

    cfg = _config(tiny[family], tmp_path / "out", text_cache=text_cache)
    images = [load_concept_images(c, cfg.resolution) for c in cfg.concepts]
    job = TrainingJob(cfg, images)
    assert (job.text_caches is not None) == (text_cache is True)  # SANA's Gemma prefix cache only when asked
    batch = job.make_batch([0, 1])
    if text_cache is True:
        job.loss(batch)  # fill the cache: the step below reads every prefix from it
        assert job.text_caches[0].misses > 0
        hits = job.text_caches[0].hits
    total, per_concept = job.loss(batch)
    if text_cache is True:
        assert job.text_caches[0].hits > hits
    total.backward()
    grads = [p.grad.clone() for p in job.embeddings[0].rows]

    # The plain forward, with the same samples.
    parts = job.parts
    enc, model, vae = parts.text_encoders[0], parts.unet, parts.vae
    for p in job.embeddings[0].rows:
        p.grad = None
    ids = batch["input_ids"][0]
    mask = (ids != 0).long()
    hidden = enc(ids, attention_mask=mask).last_hidden_state
    lat = batch["latents"].float()
    if family == "sana":
        x0 = lat * vae.config.scaling_factor
    else:
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        x0 = (lat - mean) / std
        hidden = hidden * mask.unsqueeze(-1)
    sigma = (1000 - batch["timesteps"].float()) / 1000  # shift-1 flow-matching sigmas of the 1000 steps
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    noisy = (1 - s) * x0 + s * batch["noise"]
    if family == "sana":
        pred = model(
            noisy, encoder_hidden_states=hidden, encoder_attention_mask=mask, timestep=sigma * 1000, return_dict=False
        )[0]
    else:
        pred = model(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=hidden, return_dict=False)[0]
    per_sample = ((pred - (batch["noise"] - x0)) ** 2).flatten(1).mean(1)
    plain = torch.stack([per_sample[:2].mean(), per_sample[2:].mean()])
    torch.testing.assert_close(per_concept, plain, rtol=1e-5, atol=1e-7)
    plain.sum().backward()
    for g, p in zip(grads, job.embeddings[0].rows):
        assert float(g.abs().max()) > 0
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-9)

    # Training conditioning == the pipeline's own prompt encoding (complex human instruction off for SANA).
    pipe = pipeline_from_parts(parts)
    assert isinstance(pipe, getattr(diffusers, "SanaPipeline" if family == "sana" else "WanPipeline"))
    texts = [cfg.concepts[ci].templates[0].format(job.tokens[0][ci].prompt_string) for ci in range(len(cfg.concepts))]
    ids = job.family.tokenize(parts.tokenizers[0], texts)
    with torch.no_grad():
        ours = job.encode_text([ids])
        if family == "sana":
            embeds, pmask, _, _ = pipe.encode_prompt(
                texts, do_classifier_free_guidance=False, complex_human_instruction=None
            )
            torch.testing.assert_close(ours.mask, pmask.long())
        else:
            embeds, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, max_sequence_length=512)
    # SANA: the padded positions (masked out in the transformer) are zeros, the real ones the pipeline's.
    keep = ours.mask.bool() if family == "sana" else torch.ones(ours.hidden.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(ours.hidden[keep], embeds[keep], rtol=1e-5, atol=1e-6)
    assert int(keep.sum()) > 2 * len(texts)


@pytest.mark.parametrize("family", FAMILIES)
def test_norms_stay_at_mstar_exports_reload_and_generate(tiny, tmp_path, family):
    from dti_fast.concept_files import load_concepts, read_concept, unload_concepts
    from dti_fast.generate import generate, load_pipeline

    result = train(_config(tiny[family], tmp_path / "out"))
    m_star = result.scales[0]
    # m* is the mean norm of the raw table rows (Gemma: before its sqrt(hidden) factor).
    assert m_star == pytest.approx(float(_raw_table_norms(tiny[family]).mean()), rel=1e-5)
    for name, folder in result.concept_dirs.items():
        vectors = result.vectors[name][0]
        norms = torch.linalg.vector_norm(vectors, dim=-1)
        torch.testing.assert_close(norms, torch.full_like(norms, m_star), rtol=NORM_RTOL, atol=0)
        assert sorted(p.name for p in folder.iterdir()) == ["concept.json", "learned_embeds.safetensors"]
        info = json.loads((folder / "concept.json").read_text())
        assert info["family"] == family
        torch.testing.assert_close(load_safetensors(folder / "learned_embeds.safetensors")[f"<{name}>"], vectors)
    # "red backpack": one vector per piece of this tokenizer.
    assert result.vectors["backpack"][0].shape[0] == (2 if family == "sana" else 3)

    pipe = load_pipeline(tiny[family], device="cpu", dtype="fp32")
    concept = read_concept(result.concept_dirs["backpack"])
    words = load_concepts(pipe, concept)
    assert words == [" ".join(concept.tokens)]
    ids = pipe.tokenizer.convert_tokens_to_ids(concept.tokens)
    emb = pipe.text_encoder.get_input_embeddings()
    factor = float(getattr(emb.base, "embed_scale", 1.0))
    if family == "sana":
        assert factor == pytest.approx(16**0.5)  # Gemma's sqrt(hidden) scales loaded rows as it scales the table's
    torch.testing.assert_close(emb(torch.tensor([ids]))[0], concept.vectors[0] * factor)
    # The pipeline's own tokenizer finds every one of the concept's tokens in the words, in order.
    pieces = pipe.tokenizer(words[0], add_special_tokens=False).input_ids
    assert [i for i in pieces if i >= ids[0]] == ids
    unload_concepts(pipe, [concept])
    assert "<backpack>" not in pipe.tokenizer.get_vocab()

    out = generate(
        None,
        [result.concept_dirs["backpack"], result.concept_dirs["dog"]],
        ["a photo of {}"],
        tmp_path / "gen",
        seeds=[0],
        steps=2,
        pipe=pipe,
    )
    assert out.generated == 2
    assert all("<backpack>_1" in r.prompt_text for r in out.records if r.concept == "backpack")
    from PIL import Image

    with Image.open(out.output_dir / out.records[0].file) as im:
        assert im.size == (64, 64)
    # generate() unloaded the concepts again: the tokenizer and table are the model's own.
    assert "<backpack>" not in pipe.tokenizer.get_vocab()
    assert not hasattr(pipe.text_encoder.get_input_embeddings(), "rows")


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_matches_uninterrupted_on_the_cpu(tiny, tmp_path, family):
    kw = dict(steps=4, checkpoint_every=2, keep_checkpoints=10, batch_size=1)
    full = train(_config(tiny[family], tmp_path / "full", **kw))
    killed = tmp_path / "killed" / "checkpoints"
    killed.mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "step-00000002.safetensors", killed)
    resumed = train(_config(tiny[family], tmp_path / "killed", resume=True, **kw))
    assert resumed.job_steps == 4
    for name in full.vectors:
        torch.testing.assert_close(resumed.vectors[name][0], full.vectors[name][0], rtol=0, atol=0)


def _refused_before_loading(cfg, match, monkeypatch):
    """``train(cfg)`` raises one line matching ``match`` before any weights load."""
    import dti_fast.models

    calls = []
    monkeypatch.setattr(dti_fast.models, "load_model_parts", lambda *a, **k: calls.append("weights"))
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        train(cfg)
    assert err.match(match)
    assert "\n" not in str(err.value)
    assert not calls


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_without_tokenizer_is_refused_naming_it(tiny, tmp_path, family, monkeypatch):
    broken = tmp_path / "model"
    shutil.copytree(tiny[family], broken)
    shutil.rmtree(broken / "tokenizer")
    _refused_before_loading(
        _config(broken, tmp_path / "out"), r"model '.*model' \(" + family + r"\) is missing tokenizer/", monkeypatch
    )
    # A tokenizer folder whose file is damaged: named, with the fix.
    shutil.copytree(tiny[family] / "tokenizer", broken / "tokenizer")
    (broken / "tokenizer" / "tokenizer.json").write_text("{not json")
    _refused_before_loading(
        _config(broken, tmp_path / "out"),
        r"tokenizer/tokenizer.json is not valid JSON .* the model folder is damaged: .* restore the file",
        monkeypatch,
    )


@pytest.mark.parametrize("family, init", [("sana", "<pad>"), ("wan", "\u200b"), ("wan", "<unk>")])
def test_initializer_of_no_pieces_is_refused(tiny, tmp_path, family, init, monkeypatch):
    cfg = _config(tiny[family], tmp_path / "out", names=("dog",))
    cfg.concepts[0].init = init
    _refused_before_loading(cfg, r"concept 'dog': initializer .* tokenizes to nothing", monkeypatch)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_options_refused(tiny, tmp_path, family, monkeypatch):
    if family == "wan":
        cfg = _config(tiny[family], tmp_path / "out", text_cache=True)
        _refused_before_loading(
            cfg, "--text-cache: not available for wan models .UMT5's encoder is bidirectional", monkeypatch
        )
    # A DC-AE of 64x (the real SANA one is 32x; the photos here are 384 px): a resolution that is a multiple
    # of 8 but not of the VAE's factor is refused, naming a fix, before any weights load.
    if family == "sana":
        import dti_fast.models
        from dti_fast.models import ModelPreview

        real = dti_fast.models.preview_model(tiny["sana"])
        real.vae_config["encoder_block_out_channels"] = [128, 256, 512, 512, 1024, 1024, 1024]
        monkeypatch.setattr(dti_fast.models, "preview_model", lambda *a, **k: ModelPreview(**real.__dict__))
        cfg = _config(tiny[family], tmp_path / "out", resolution=200)
        match = "resolution 200 is not a multiple of this model's VAE factor 64.*192"
        _refused_before_loading(cfg, match, monkeypatch)
    if family == "sana":
        cfg = _config(tiny[family], tmp_path / "out")
        cfg.concepts[0].placeholder = "<Dog>"
        _refused_before_loading(cfg, "SanaPipeline lower-cases prompts", monkeypatch)


def test_make_tiny_model_command(tmp_path, capsys):
    from dti_fast.cli import main
    from dti_fast.models import detect_family

    for family in FAMILIES:
        assert main(["make-tiny-model", "--family", family, str(tmp_path / family)]) == 0
        assert detect_family(tmp_path / family) == family
        assert (tmp_path / family / "tokenizer" / "tokenizer.json").is_file()


def test_tiny_tokenizers_are_real_files_of_their_kind(tiny):
    from transformers import AutoTokenizer

    gemma = AutoTokenizer.from_pretrained(tiny["sana"] / "tokenizer")
    t5 = AutoTokenizer.from_pretrained(tiny["wan"] / "tokenizer")
    assert type(gemma).__name__ == "GemmaTokenizer" and type(t5).__name__ == "T5Tokenizer"
    ids = gemma("a photo of a dog").input_ids
    assert ids[0] == gemma.bos_token_id and gemma.convert_ids_to_tokens(ids[-1]) == "▁dog"
    ids = t5("a photo of a dog").input_ids
    assert ids[-1] == t5.eos_token_id and t5.convert_ids_to_tokens(ids[:2]) == ["▁a", "▁photo"]


@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_suite_trains_generates_scores_and_slerps(tiny, tiny_metrics, tmp_path, family):
    from dti_fast.suite import SuiteConfig, run_suite

    out = tmp_path / "suite"
    cfg = SuiteConfig(
        output_dir=out,
        quick=True,
        model=str(tiny[family]),
        subjects=["cat2", "dog"],
        steps=2,
        max_prompts=1,
        inference_steps=2,
        slerp_steps=3,
        dino_model=str(tiny_metrics["dino"]),
        siglip_model=str(tiny_metrics["siglip"]),
        clip_model=str(tiny_metrics["clip"]),
        progress=False,
    )
    run_suite(cfg)
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == family
    m_star = float(_raw_table_norms(tiny[family]).mean())
    for per_subject in report["norms"]["dti"].values():
        for norm in per_subject[0]:
            assert norm == pytest.approx(m_star, rel=1e-5)
    assert set(report["table"]) == {"dti", "ti", "ti-rescaled"}
    assert (out / "slerp" / "dti" / "strip_slerp.png").is_file()
    # The slerp midpoint stays at m*.
    from dti_fast.concept_files import read_concept

    mids = [p for p in (out / "slerp" / "dti" / "slerp").iterdir() if p.is_dir()]
    assert mids
    for folder in mids:
        norms = torch.linalg.vector_norm(read_concept(folder).vectors[0], dim=-1)
        torch.testing.assert_close(norms, torch.full_like(norms, m_star), rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_contextual_states_are_the_conditioning_at_the_texts_pieces(tiny, family):
    """The CrossInit hook: the encoder's output the denoiser reads, at the initializer's own pieces."""
    from dti_fast.families import family_of
    from dti_fast.models import load_model_parts, pipeline_from_parts

    parts = load_model_parts(tiny[family])
    fam = family_of(family)
    tok, enc = parts.tokenizers[0], parts.text_encoders[0]
    states = fam.contextual_states(tok, enc, "red backpack")
    pieces = tok("red backpack", add_special_tokens=False).input_ids
    assert states.shape == (len(pieces), enc.config.hidden_size if family == "sana" else enc.config.d_model)
    pipe = pipeline_from_parts(parts)
    with torch.no_grad():
        if family == "sana":
            embeds = pipe.encode_prompt(
                "red backpack", do_classifier_free_guidance=False, complex_human_instruction=None
            )[0]
            start = 1  # after <bos>
        else:
            embeds = pipe.encode_prompt("red backpack", do_classifier_free_guidance=False, max_sequence_length=512)[0]
            start = 0
    torch.testing.assert_close(states, embeds[0, start : start + len(pieces)].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_xinit_starts_dti_rows_at_the_contextual_direction(tiny, tmp_path, family):
    """``--init xinit`` on SANA/Wan: the registry reaches the family's states; DTI rows start there at m*."""
    from dti_fast.data import load_concept_images
    from dti_fast.distributed import DistContext
    from dti_fast.embedding import contextual_states
    from dti_fast.families import family_of
    from dti_fast.models import load_model_parts
    from dti_fast.train import TrainingJob

    parts = load_model_parts(tiny[family])
    tok, enc = parts.tokenizers[0], parts.text_encoders[0]
    ids = tok("red backpack", add_special_tokens=False).input_ids
    want = family_of(family).contextual_states(tok, enc, "red backpack")
    torch.testing.assert_close(contextual_states(tok, enc, "red backpack", ids), want)
    cfg = _config(tiny[family], tmp_path / "out", names=("backpack",), init="xinit", steps=1)
    images = [load_concept_images(c, cfg.resolution) for c in cfg.concepts]
    job = TrainingJob(cfg, images, DistContext(), tmp_path / "ckpt")  # the start rows: no step taken
    rows = job.embeddings[0].rows[0].detach().float()
    m_star = float(job.embeddings[0].scale)
    torch.testing.assert_close(rows, torch.nn.functional.normalize(want, dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(job.embeddings[0].priors[0].float(), rows, rtol=1e-5, atol=1e-6)
    assert m_star > 0
