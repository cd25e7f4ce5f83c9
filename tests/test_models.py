"""Tests for dti_fast.models: tiny model building, loading, the CLIP tokenizer assets, and input errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dti_fast import models, testing  # noqa: E402
from dti_fast.models import ModelParts, detect_family, load_model_parts  # noqa: E402
from dti_fast.testing import clip_tokenizer_files, make_tiny_model, tiny_model_path  # noqa: E402

HIDDEN = {"sd": [32], "sdxl": [32, 64]}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict:
    """Each tiny family built once for the whole session."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny_model(root / fam, family=fam, seed=0) for fam in ("sd", "sdxl")}


@pytest.fixture(scope="session")
def parts(tiny_dirs) -> dict:
    return {fam: load_model_parts(str(p)) for fam, p in tiny_dirs.items()}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_tiny_layout(tiny_dirs, family):
    d = tiny_dirs[family]
    index = json.loads((d / "model_index.json").read_text())
    subs = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if family == "sd":
        assert index["_class_name"] == "StableDiffusionPipeline"
        assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
        assert index["requires_safety_checker"] is False
        assert not (d / "text_encoder_2").exists()
    else:
        assert index["_class_name"] == "StableDiffusionXLPipeline"
        assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
        subs += ["text_encoder_2", "tokenizer_2"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["_dti_fast_tiny"] == testing.TINY_VERSION
    for sub in subs:
        assert (d / sub).is_dir(), sub
    for sub in ("unet", "vae"):
        assert (d / sub / "diffusion_pytorch_model.safetensors").is_file()
    assert (d / "text_encoder" / "model.safetensors").is_file()
    assert not list(d.rglob("*.bin"))
    for tok in [s for s in subs if s.startswith("tokenizer")]:
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            assert (d / tok / f).is_file(), f"{tok}/{f}"
    sched = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler"
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert sched["num_train_timesteps"] == 1000 and sched["prediction_type"] == "epsilon"


def test_sdxl_unet_conditioning_is_consistent(parts):
    p = parts["sdxl"]
    te2 = p.text_encoders[1].config
    cfg = p.unet.config
    assert cfg.addition_embed_type == "text_time"
    assert cfg.cross_attention_dim == sum(p.hidden_sizes) == 96
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + te2.projection_dim
    assert parts["sd"].unet.config.cross_attention_dim == 32


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_text_encoder_checkpoints_use_real_keys(parts, tiny_dirs, family):
    """Keys as in real SD checkpoints (``text_model.*``, ``text_projection.weight``), so every
    transformers version loads the same weights; and the loaded weights are the saved ones."""
    from safetensors.torch import load_file

    for sub, te in zip(["text_encoder", "text_encoder_2"], parts[family].text_encoders):
        saved = load_file(str(tiny_dirs[family] / sub / "model.safetensors"))
        assert all(k.startswith(("text_model.", "text_projection.")) for k in saved), sub
        assert not any(k.startswith("text_model.text_model.") for k in saved), sub
        table = saved["text_model.embeddings.token_embedding.weight"]
        assert torch.equal(te.get_input_embeddings().weight, table)
        assert ("text_projection.weight" in saved) == (sub == "text_encoder_2")


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_text_encoders_are_clip(parts, family):
    for te in parts[family].text_encoders:
        c = te.config
        assert (c.vocab_size, c.max_position_embeddings, c.hidden_act) == (49408, 77, "quick_gelu")
        assert c.num_hidden_layers >= 2
    assert parts[family].hidden_sizes == HIDDEN[family]


# ------------------------------------------------------------------------------------------
# diffusers pipelines accept the folders
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_pipeline_generates(tiny_dirs, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(str(tiny_dirs[family]))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a photo of a stuffed animal",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    img = out.images
    assert img.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(img)).all()


# ------------------------------------------------------------------------------------------
# load_model_parts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_load_model_parts(parts, tiny_dirs, family):
    from diffusers import DDPMScheduler

    p = parts[family]
    assert isinstance(p, ModelParts)
    assert p.family == family
    n = 1 if family == "sd" else 2
    assert len(p.tokenizers) == n and len(p.text_encoders) == n
    assert p.source == str(tiny_dirs[family])
    assert p.extras.get("tiny") == testing.TINY_VERSION
    for m in (*p.text_encoders, p.unet, p.vae):
        assert not m.training
        assert not any(q.requires_grad for q in m.parameters())
        assert next(m.parameters()).dtype == torch.float32
    assert isinstance(p.noise_scheduler, DDPMScheduler)
    assert p.noise_scheduler.config.prediction_type == "epsilon"
    assert p.noise_scheduler.config.num_train_timesteps == 1000
    assert p.vae_scale_factor == 8 and p.resolution == 64
    if family == "sdxl":
        assert type(p.text_encoders[1]).__name__ == "CLIPTextModelWithProjection"


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_gradient_reaches_the_text_conditioning(parts, family):
    """The DTI training path: latents from the VAE, conditioning from the text encoders, grads to the context."""
    p = parts[family]
    bsz = 2
    img = torch.rand(bsz, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = p.vae.encode(img).latent_dist.sample() * p.vae.config.scaling_factor
    assert latents.shape == (bsz, 4, 8, 8)
    hidden, pooled = [], None
    for tok, te in zip(p.tokenizers, p.text_encoders):
        ids = tok(
            ["a photo of a sks toy"] * bsz, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2] if family == "sdxl" else out.last_hidden_state)
        pooled = getattr(out, "text_embeds", None)
    ctx = torch.cat(hidden, dim=-1).detach().requires_grad_(True)
    kw = {}
    if family == "sdxl":
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * bsz)
        kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (bsz,))
    noisy = p.noise_scheduler.add_noise(latents, noise, t)
    pred = p.unet(noisy, t, ctx, **kw).sample
    torch.nn.functional.mse_loss(pred, noise).backward()
    assert ctx.grad is not None and torch.isfinite(ctx.grad).all() and ctx.grad.abs().sum() > 0
    assert all(q.grad is None for q in p.unet.parameters())


def test_detect_family(tiny_dirs, tmp_path):
    assert detect_family(tiny_dirs["sd"]) == "sd"
    assert detect_family(tiny_dirs["sdxl"]) == "sdxl"
    bare = tmp_path / "bare"
    (bare / "text_encoder_2").mkdir(parents=True)
    assert detect_family(bare) == "sdxl"


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


def test_tokenizer_assets():
    vocab_file, merges_file = clip_tokenizer_files()
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    lines = merges_file.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version") and len(lines) == 1 + 48894
    assert (vocab_file.parent / "LICENSE").is_file()


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_tokenizer_ids(tiny_dirs, family):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tiny_dirs[family] / "tokenizer"))
    assert tok.model_max_length == 77
    ids = tok("a photo of a stuffed animal").input_ids
    # Ids as real SD's CLIP tokenizer gives them: bos, a, photo, of, a, stuffed, animal, eos.
    assert ids == [49406, 320, 1125, 539, 320, 11781, 4668, 49407]
    assert tok.tokenize("stuffed animal") == ["stuffed</w>", "animal</w>"]
    assert tok.convert_tokens_to_ids("sks</w>") == 48136  # the DreamBooth rare token
    assert tok.tokenize("A  Photo") == ["a</w>", "photo</w>"]  # lower-cased, whitespace collapsed
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 49407
    padded = tok("a photo", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_sdxl_tokenizer_2_pads_with_bang(tiny_dirs):
    from transformers import CLIPTokenizer

    tok1 = CLIPTokenizer.from_pretrained(str(tiny_dirs["sdxl"] / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(str(tiny_dirs["sdxl"] / "tokenizer_2"))
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0
    assert tok1.pad_token_id == 49407
    text = "a photo of a stuffed animal"
    assert tok1(text).input_ids == tok2(text).input_ids  # same vocabulary
    padded = tok2(text, padding="max_length", max_length=77).input_ids
    assert padded[:8] == [49406, 320, 1125, 539, 320, 11781, 4668, 49407] and set(padded[8:]) == {0}


# ------------------------------------------------------------------------------------------
# Errors, raised before anything heavy loads
# ------------------------------------------------------------------------------------------


@pytest.fixture
def no_heavy_loading(monkeypatch):
    """Make any weight loading fail loudly, to prove the errors come first."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the input was validated")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", boom)
    monkeypatch.setattr(CLIPTextModel, "from_pretrained", boom)


@pytest.mark.parametrize("bad", ["/no/such/dir/model", "./missing-model", "~/no-such-model-dti", "a/b/c"])
def test_missing_path(bad, no_heavy_loading):
    with pytest.raises(FileNotFoundError) as e:
        load_model_parts(bad)
    msg = str(e.value)
    assert bad in msg and "does not exist" in msg and "model id" in msg


def test_missing_subfolder_is_named(tiny_dirs, tmp_path, no_heavy_loading):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["sdxl"], broken, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.rmtree(broken / "unet")
    shutil.rmtree(broken / "tokenizer_2")
    (broken / "vae" / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_model_parts(str(broken))
    msg = str(e.value)
    assert str(broken) in msg
    assert "unet/" in msg and "tokenizer_2/" in msg and "vae/config.json" in msg
    assert "text_encoder/" not in msg.split("missing")[1].split(";")[0]


def test_single_file_checkpoint_is_explained(tmp_path, no_heavy_loading):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="from_single_file"):
        load_model_parts(str(ckpt))


def test_unsupported_pipeline(tmp_path, no_heavy_loading):
    d = tmp_path / "sd3"
    d.mkdir()
    (d / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]})
    )
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline"):
        load_model_parts(str(d))


def test_unknown_id_offline_fails_fast(offline, tmp_path, no_heavy_loading):
    model = "dti-fast-tests/no-such-model"
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as e:
        load_model_parts(model, cache_dir=str(tmp_path / "hf"))
    elapsed = time.perf_counter() - t0
    msg = str(e.value)
    assert model in msg and "not a local folder" in msg and "Hugging Face cache" in msg
    assert "pass the folder" in msg
    assert elapsed < 5.0, elapsed


def test_unreachable_hub_is_detected_fast(monkeypatch):
    from huggingface_hub import constants

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(models, "_REACHABLE", {})
    t0 = time.perf_counter()
    assert models.hub_reachable(timeout=2.0) is False
    assert time.perf_counter() - t0 < 3.5


def test_cached_id_loads_offline(tiny_dirs, tmp_path, offline):
    """A hub id found in the Hugging Face cache loads with the hub disabled."""
    cache = tmp_path / "hf"
    repo = cache / "models--dti-fast-tests--tiny-sd"
    commit = "0" * 40
    (repo / "snapshots").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    os.symlink(tiny_dirs["sd"], repo / "snapshots" / commit, target_is_directory=True)
    p = load_model_parts("dti-fast-tests/tiny-sd", cache_dir=str(cache))
    assert p.family == "sd" and p.hidden_sizes == [32]
    assert p.source == str(repo / "snapshots" / commit)


def _hub_error(cls):
    err = cls.__new__(cls)
    Exception.__init__(err, "404")
    return err


def test_online_id_resolves_to_the_hub(tiny_dirs, monkeypatch):
    """With the hub reachable, an id is checked through its model_index.json only, then loaded by id."""
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    monkeypatch.setattr(models, "hub_reachable", lambda timeout=2.0: True)
    monkeypatch.setattr(models, "offline_by_env", lambda: False)
    fetched = []

    def fake_download(repo_id, filename, **kw):
        fetched.append(filename)
        return str(tiny_dirs["sdxl"] / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    r = models.resolve_source("org/some-sdxl", revision=None, cache_dir=None)
    assert (r.source, r.family, r.local) == ("org/some-sdxl", "sdxl", False)
    assert fetched == ["model_index.json"]

    for cls, exc, words in (
        (RepositoryNotFoundError, FileNotFoundError, "no Hugging Face model"),
        (GatedRepoError, PermissionError, "gated"),
    ):

        def fail(repo_id, filename, _cls=cls, **kw):
            raise _hub_error(_cls)

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
        with pytest.raises(exc, match=words):
            models.resolve_source("org/typo", revision=None, cache_dir=None)


def test_component_folder_hint(tiny_dirs, no_heavy_loading):
    with pytest.raises(ValueError, match="pass the model folder above it"):
        load_model_parts(str(tiny_dirs["sd"] / "unet"))


def test_looks_like_path():
    for s in ("/x", "./x", "../x", "~/x", "a/b/c", "C:\\models\\x", "x.safetensors", "a b"):
        assert models.looks_like_path(s), s
    for s in ("runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0", "gpt2"):
        assert not models.looks_like_path(s), s


# ------------------------------------------------------------------------------------------
# tiny_model_path
# ------------------------------------------------------------------------------------------


def test_tiny_model_path_builds_once(tmp_path, tiny_dirs):
    d = tiny_model_path("sd", cache_dir=tmp_path)
    assert d == tmp_path / f"tiny-sd-v{testing.TINY_VERSION}"
    assert detect_family(d) == "sd"
    stamp = (d / "model_index.json").stat().st_mtime_ns
    assert tiny_model_path("sd", cache_dir=tmp_path) == d
    assert (d / "model_index.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [d.name]  # no temp folders left
    # Same seed, same weights as the fixture's build.
    for f in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (d / f).read_bytes() == (tiny_dirs["sd"] / f).read_bytes()
    with pytest.raises(ValueError):
        tiny_model_path("sd3", cache_dir=tmp_path)


def test_parts_of_different_models_are_refused_from_the_configs(tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(tiny_model_path("sd"), folder)
    cfg_file = folder / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["cross_attention_dim"] = 48
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not fit together: .* give 32 = 32 features .* takes 48"):
        load_model_parts(folder)


class _RunsCode:
    marker = None

    def __reduce__(self):
        import os

        return (os.system, (f"touch {_RunsCode.marker}",))


@pytest.mark.parametrize(
    "part, weights, pickled",
    [
        ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ],
)
def test_pickled_weights_that_would_run_code_are_refused_by_name(tmp_path, part, weights, pickled):
    import pickle
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_path("sd"), folder)
    _RunsCode.marker = tmp_path / "pwned"
    (folder / part / weights).unlink()
    with open(folder / part / pickled, "wb") as fh:
        pickle.dump({"conv_in.weight": _RunsCode()}, fh)
    with pytest.raises(ValueError, match="weights stored as a pickle that torch refuses to load safely"):
        load_model_parts(folder)
    assert not _RunsCode.marker.exists()
