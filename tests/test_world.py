"""The toy world (issue 16): renderer, grammar, tokenizer, the shipped base model, build-base, the quick suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dti_fast.world import concepts as C
from dti_fast.world import render as R
from dti_fast.world.tokenizer import BOS, EOS, build_bpe, check_tokenizer, word_ids, world_words, write_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_render_is_seeded_and_captions_state_the_scene():
    rng = np.random.default_rng(3)
    spec = R.sample_spec(rng)
    a, b = np.asarray(R.render(spec)), np.asarray(R.render(spec))
    assert a.shape == (64, 64, 3) and (a == b).all()
    text = R.describe(spec)
    assert spec.main[0].shape in text or R.PLURALS[spec.main[0].shape] in text
    assert f"{spec.bg} background" in text
    assert len(R.SHAPES) >= 6 and len(R.COLOURS) >= 8 and len([t for t in R.TEXTURES if t != "plain"]) >= 2


def test_held_out_triples_never_sampled_for_training_but_every_word_is():
    rng = np.random.default_rng(0)
    specs = [R.sample_spec(rng, held=False) for _ in range(400)]
    assert not any(R.held_out(s.main[0].shape, s.main[0].colour, s.bg) for s in specs)
    held = [R.sample_spec(rng, held=True) for _ in range(20)]
    assert all(R.held_out(s.main[0].shape, s.main[0].colour, s.bg) for s in held)
    from dti_fast.world.base import _templates, training_caption

    words = set()
    for s in specs:
        for _ in range(3):
            words.update(training_caption(s, rng).replace("-", " - ").split())
    for t in _templates():
        words.update(t.replace("{}", "").replace("-", " - ").split())
    assert set(world_words()) <= words  # no vocabulary row that training never touches


def test_tokenizer_one_id_per_word(tmp_path):
    tok = write_tokenizer(tmp_path / "tok")
    check_tokenizer(tok)  # raises if a word splits
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    ids = again("a photo of a small red circle at the top left on a striped blue background").input_ids
    assert ids[0] == again.convert_tokens_to_ids(BOS) and ids[-1] == again.convert_tokens_to_ids(EOS)
    assert len(ids) == 2 + 16
    vocab, _ = build_bpe(world_words())
    assert len(word_ids(vocab)) == len(world_words()) + 2


def test_concept_photos(tmp_path):
    folders = C.write_photos(tmp_path, n=4)
    assert set(folders) == {c.name for c in C.ALL}
    for f in folders.values():
        assert len(list(f.glob("*.png"))) == 4
    assert all(c.init in world_words() for c in C.ALL)


def test_concepts_are_unseen_but_between_named_things():
    """What the base model trains on never shows a concept; each object concept lies between two named things."""
    named = set(R.COLOURS.values())
    rng = np.random.default_rng(5)
    for _ in range(300):
        spec = R.sample_spec(rng, held=False)
        assert all(o.shape in R.SHAPES and o.colour in R.COLOUR_NAMES for o in spec.objects)
    assert C.TEAL not in named and C.MAGENTA not in named
    for c in C.OBJECTS:
        assert len(c.lookalikes) == 2 and all(s in R.SHAPES and col in R.COLOUR_NAMES for s, col in c.lookalikes)
        look = np.asarray(R.render(C.lookalike_spec(c, np.random.default_rng(1))))
        assert look.shape == (64, 64, 3)
    # the unnamed colours sit halfway between their neighbours
    for mid, (a, b) in ((C.TEAL, ("green", "cyan")), (C.MAGENTA, ("pink", "purple"))):
        assert all(abs(m - (x + y) / 2) <= 0.5 for m, x, y in zip(mid, R.COLOURS[a], R.COLOURS[b]))


def test_training_timesteps_shift_toward_the_noisy_end():
    from dti_fast.world.base import training_timesteps

    # shift 1 is the original uniform draw, stream for stream (builds made before the option reproduce)
    a = training_timesteps(64, torch.Generator().manual_seed(3), 1.0, 1000)
    assert torch.equal(a, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))
    t = training_timesteps(40000, torch.Generator().manual_seed(0), 3.0, 1000)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) == 999
    # s u / (1 + (s - 1) u) > 3/4  <=>  u > 1/2 at s = 3: half the draws in the noisiest quarter
    assert abs(float((t >= 750).float().mean()) - 0.5) < 0.01
    assert abs(float((t < 250).float().mean()) - 0.1) < 0.01  # u < 1/10
    assert torch.equal(t, training_timesteps(40000, torch.Generator().manual_seed(0), 3.0, 1000))


def test_build_base_refuses_a_device_this_machine_lacks_before_any_work(tmp_path):
    out = tmp_path / "wb"
    cmd = [sys.executable, "-m", "dti_fast.cli", "world", "build-base", "--output", str(out), "--device"]
    for device, says in (("cuda:7", "cuda:7"), ("gpu", "not a torch device")):
        if device.startswith("cuda") and torch.cuda.device_count() > 7:
            continue
        res = subprocess.run(cmd + [device], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr[-2000:]
        assert says in res.stderr and "Traceback" not in res.stderr
        assert "rendered" not in res.stdout and not out.exists()


def test_training_noise_hides_the_mean():
    from dti_fast.world.base import BuildConfig, pyramid_noise, training_noise

    gen = torch.Generator().manual_seed(0)
    white = torch.randn((256, 4, 16, 16), generator=gen)
    off = training_noise((256, 4, 16, 16), gen, BuildConfig(offset_noise=0.3))
    # per-channel means (what the background colour is made of): std 1/16 in white noise, ~0.31 with the offset
    assert white.mean(dim=(2, 3)).std() < 0.08 and 0.25 < off.mean(dim=(2, 3)).std() < 0.4
    assert 0.9 < off.std() < 1.15  # the white part keeps its full power
    plain = training_noise((2, 4, 16, 16), torch.Generator().manual_seed(1), BuildConfig(offset_noise=0.0))
    assert torch.equal(plain, torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1)))

    gen = torch.Generator().manual_seed(0)
    white = torch.randn((256, 4, 16, 16), generator=gen)
    pyr = pyramid_noise((256, 4, 16, 16), gen, 0.8)
    assert torch.allclose(pyr.std(dim=(1, 2, 3)), torch.ones(256), atol=1e-5)
    # per-channel means (what the background colour is made of) vary several times more than in white noise
    assert pyr.mean(dim=(2, 3)).std() > 4 * white.mean(dim=(2, 3)).std()
    assert torch.equal(pyramid_noise((2, 4, 16, 16), torch.Generator().manual_seed(1), 0.8),
                       pyramid_noise((2, 4, 16, 16), torch.Generator().manual_seed(1), 0.8))  # fmt: skip


def test_shipped_base_model_loads_with_project_apis(tmp_path):
    from dti_fast.models import detect_family, load_model_parts
    from dti_fast.world.base import SHIPPED, world_model_path

    assert (SHIPPED / "model_index.json").is_file(), "the world base model ships with the package"
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 15e6
    path = world_model_path(cache_dir=tmp_path)
    assert detect_family(path) == "sd"
    parts = load_model_parts(path)
    assert parts.resolution == 64
    emb = parts.text_encoders[0].get_input_embeddings().weight
    norms = torch.linalg.vector_norm(emb.float(), dim=-1)
    vocab = json.loads((path / "tokenizer" / "vocab.json").read_text())
    used = word_ids(vocab)
    assert (norms[used] > 0).all()
    unused = [i for i in range(len(norms)) if i not in set(used)]
    assert (norms[unused] == 0).all()  # BPE-only pieces: zero rows, excluded from m*


def test_build_base_tiny(tmp_path):
    out = tmp_path / "wb"
    cmd = [
        sys.executable,
        "-m",
        "dti_fast.cli",
        "world",
        "build-base",
        "--output",
        str(out),
        "--images",
        "64",
        "--vae-steps",
        "2",
        "--steps",
        "2",
        "--batch",
        "4",
        "--scorer-steps",
        "2",
        "--offset-noise",
        "0.3",
        "--ema",
        "0.999",
        "--no-zero-snr",
        "--device",
        "cpu",
        "--vae-object-weight",
        "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    from dti_fast.models import detect_family

    assert detect_family(out) == "sd"
    assert (out / "world_scorer" / "scorer.safetensors").is_file()
    summary = json.loads((out / "world_build.json").read_text())
    assert summary["steps_done"] == 2 and summary["zero_rows"] > 0
    assert summary["scorer_parallel"] and summary["config"]["offset_noise"] == 0.3 and summary["config"]["ema"] == 0.999
    # the VAE's L1 weighted toward the objects' pixels
    assert summary["config"]["vae_object_weight"] == 2 and 0.0 < summary["object_fraction"] < 0.6
    # --no-zero-snr: SD's schedule and the epsilon target; the defaults' shift and UNet-stage threads
    assert not summary["config"]["zero_snr"] and summary["config"]["timestep_shift"] == 3.0
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon" and not sched.get("rescale_betas_zero_snr")
    # the scorer's process is done before the UNet stage, which then has the cores it asked for
    assert "scorer finished" in res.stdout and summary["unet_threads"] == 2 and summary["device"] == "cpu"
    assert res.stdout.index("scorer finished") < res.stdout.index("unet step 0/")
    # the gate's ceiling this VAE sets, logged before the UNet stage and recorded
    ceiling = summary["vae_gate_ceiling"]
    assert 0.0 <= ceiling["text_fidelity"] <= 1.0 and ceiling["scenes"] == 96
    assert "main_shape" in ceiling["per_attribute"]
    assert res.stdout.index("the gate's ceiling") < res.stdout.index("unet step 0/")
    # the scorer trained beside the base model in its own process equals one trained here, serially
    from safetensors.torch import load_file

    from dti_fast.world.base import _scorer_job

    _scorer_job(str(tmp_path / "serial"), 2, 0, None, 500, 300, 1)
    a, b = (
        load_file(str(out / "world_scorer" / "scorer.safetensors")),
        load_file(str(tmp_path / "serial" / "scorer.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a second stage on top of it, with zero terminal SNR and v-prediction: saved in the scheduler config
    out2 = tmp_path / "wb2"
    cmd2 = cmd[:6] + [str(out2), "--images", "64", "--steps", "2", "--batch", "4", "--scorer-steps", "2"]
    res = subprocess.run(cmd2 + ["--resume-from", str(out), "--zero-snr"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out2 / "world_build.json").read_text())
    assert summary["config"]["zero_snr"] and summary["resumed_from"]["folder"] == str(out)
    sched = json.loads((out2 / "scheduler" / "scheduler_config.json").read_text())
    assert sched["rescale_betas_zero_snr"] and sched["prediction_type"] == "v_prediction"
    assert sched["timestep_spacing"] == "trailing"
    # the trainer's scheduler: the last step is pure noise and the target there is -x0
    from dti_fast.families import family_of
    from dti_fast.models import load_model_parts

    parts = load_model_parts(out2)
    fam = family_of("sd")
    assert float(parts.noise_scheduler.alphas_cumprod[-1]) == 0.0
    x0, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    noisy, target, _ = fam.noisy_and_target(parts.noise_scheduler, x0, noise, torch.tensor([999, 999]))
    assert torch.allclose(noisy, noise) and torch.allclose(target, -x0)
    # the sampler keeps the model's schedule: DDIM on trailing steps, starting at t = 999
    from dti_fast.generate import load_pipeline

    pipe = load_pipeline(str(out2), device="cpu", dtype="fp32")
    pipe.scheduler.set_timesteps(20)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and int(pipe.scheduler.timesteps[0]) == 999
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_quick_toy_suite_end_to_end(tmp_path):
    from dti_fast.cli import main

    assert main(["suite", "--world", "toy", "--quick", "--output", str(tmp_path / "s")]) == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert set(report["table"]) == {"ti", "ti-rescaled", "dti", "dti-xinit"}
    assert report["scorer_validation"]["text_fidelity_on_renders"] > 0.9
    m_star = report["m_star"]
    for norms in report["norms"]["dti"].values():
        assert all(abs(n - m_star) < 1e-3 for n in norms)
    for method in ("ti-rescaled", "dti-xinit"):
        for norms in report["norms"][method].values():
            assert all(abs(n - m_star) < 1e-3 for n in norms)
    assert "DTI + CrossInit" in (tmp_path / "s" / "report.md").read_text()
    assert set(report["paired_vs_ti"]) == {"ti-rescaled", "dti", "dti-xinit"}
    assert "Paired differences against TI" in (tmp_path / "s" / "report.md").read_text()
    for name in ("text_by_level", "norms_encoder1", "tradeoff", "slerp_curve"):
        assert (tmp_path / "s" / "plots" / f"{name}.png").is_file()
    md = (tmp_path / "s" / "report.md").read_text()
    assert "Smoke test" in md and "sanity gate" in md and "VAE's ceiling" in md
    assert 0.0 <= report["gate"]["vae_ceiling"]["text_fidelity"] <= 1.0


def test_gate_command_prints_the_gate_and_refuses_a_folder_without_scorer(tmp_path, capsys):
    from dti_fast.cli import main

    assert main(["world", "gate", "--prompts", "3", "--inference-steps", "2", "--output", str(tmp_path / "g")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == 3 and 0.0 <= out["text_fidelity"] <= 1.0 and out["pass"] == (out["text_fidelity"] >= 0.8)
    assert {"bg", "main_shape"} <= set(out["per_attribute"])
    assert 0.0 <= out["vae_ceiling"] <= 1.0 and set(out["vae_ceiling_per_attribute"]) == set(out["per_attribute"])
    assert (tmp_path / "g" / "gate.png").is_file()
    (tmp_path / "empty").mkdir()
    assert main(["world", "gate", "--model", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no world_scorer" in err and "build-base" in err and "Traceback" not in err


def test_paired_differences_pair_images_by_concept_prompt_and_seed():
    from dti_fast.world.suite import paired_differences

    def rows(shift, text_shift, order):
        out = [
            {"concept": c, "prompt": f"p{p}", "seed": s, "subject": 0.1 * p + shift, "text": None if p == 0 else 0.5}
            for c in ("a", "b")
            for p in range(3)
            for s in range(4)
        ]
        for r in out:
            if r["text"] is not None:
                r["text"] += text_shift
        return out[::order]

    d = paired_differences({"ti": rows(0.0, 0.0, 1), "dti": rows(0.25, 0.0, -1), "x": rows(-0.1, 0.2, 1)}, "ti")
    assert set(d) == {"dti", "x"}
    assert d["dti"]["subject"]["pairs"] == 24 and d["dti"]["text"]["pairs"] == 16  # level-0 prompts state no text
    assert abs(d["dti"]["subject"]["mean"] - 0.25) < 1e-9 and abs(d["dti"]["subject"]["low"] - 0.25) < 1e-9
    assert abs(d["x"]["text"]["mean"] - 0.2) < 1e-9 and abs(d["x"]["subject"]["high"] + 0.1) < 1e-9
    assert paired_differences({"dti": rows(0, 0, 1)}, "ti") == {}


def test_level_zero_prompts_differ_per_draw():
    import numpy as np

    from dti_fast.world import concepts as C
    from dti_fast.world.suite import _prompts_for

    for c in (C.BY_NAME["tealcircle"], C.BY_NAME["outlined"]):
        alone = [p for p, level, _ in _prompts_for(c, np.random.default_rng(0), 3) if level == 0]
        assert len(alone) == 3 and len(set(alone)) == 3 and all("{}" in p for p in alone)


def test_a_cached_copy_of_an_earlier_shipped_model_is_replaced_and_a_users_build_is_kept(tmp_path):
    from dti_fast.world.base import SHIPPED, SHIPPED_MARK, world_model_path

    path = world_model_path(cache_dir=tmp_path)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (path / unet).read_bytes() == (SHIPPED / unet).read_bytes()
    # A copy made from an earlier shipped model (another id, other weights) is refreshed.
    (path / SHIPPED_MARK).write_text(json.dumps({"shipped": "an earlier model"}))
    (path / unet).write_bytes(b"old weights")
    again = world_model_path(cache_dir=tmp_path)
    assert again == path and (path / unet).read_bytes() == (SHIPPED / unet).read_bytes()
    assert not [p for p in tmp_path.iterdir() if "stale" in p.name]
    # A model the user built there (no mark) is theirs: kept as it is.
    (path / SHIPPED_MARK).unlink()
    (path / unet).write_bytes(b"the user's weights")
    assert world_model_path(cache_dir=tmp_path) == path and (path / unet).read_bytes() == b"the user's weights"


def test_readme_stage_commands_give_the_configs_the_shipped_build_recorded():
    """The README's commands that made the shipped model, parsed by today's CLI, are the recipes its
    build log records (its last stage and the one it resumed from): a changed default cannot
    silently change what they build."""
    import shlex

    from dti_fast.cli import build_parser
    from dti_fast.world.base import SHIPPED
    from dti_fast.world.cli import build_config

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index('THEN="') :]
    block = block[: block.index("```")]
    lines = block.strip().splitlines()
    then = shlex.split(lines[0].split("=", 1)[1])[0]
    stages = {}
    for line in lines[1:]:
        argv = shlex.split(line.replace("$THEN", then))
        assert argv[:3] == ["dti-fast", "world", "build-base"], line
        args = build_parser().parse_args(argv[1:])
        stages[str(args.output)] = build_config(args)
    log = json.loads((SHIPPED / "world_build.json").read_text(encoding="utf-8"))
    recorded = [(stages["world_base"], log["config"], log["steps_done"])]
    recorded.append((stages["stage6"], log["resumed_from"]["config"], log["resumed_from"]["steps_done"]))
    keys = ("seed", "images", "batch", "lr", "empty_caption", "threads", "offset_noise", "pyramid", "ema", "zero_snr")
    for cfg, then_cfg, steps_done in recorded:
        assert {k: getattr(cfg, k) for k in keys} == {k: then_cfg[k] for k in keys}
        assert cfg.steps == steps_done and cfg.resume_from  # the count the stage ran; a further stage
        # options added since: their values then (uniform timesteps, one thread, the CPU)
        assert cfg.timestep_shift == 1.0 and cfg.unet_threads == 1 and cfg.device == "cpu"
        assert cfg.vae_object_weight == 0.0  # plain L1 (the VAE itself was trained in stage 1)


def test_a_build_into_the_cache_says_the_suite_now_uses_it_and_how_to_go_back(tmp_path):
    from dti_fast.world.base import WORLD_VERSION, world_model_path

    env = dict(os.environ, DTI_FAST_CACHE=str(tmp_path / "cache"))
    tiny = ["--images", "64", "--vae-steps", "2", "--steps", "2", "--batch", "4", "--scorer-steps", "2"]
    cmd = [sys.executable, "-m", "dti_fast.cli", "world", "build-base", *tiny, "--unet-threads", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    folder = tmp_path / "cache" / f"world-base-v{WORLD_VERSION}"
    assert "the toy suite now uses this model" in res.stdout and f"remove {folder}" in res.stdout
    assert world_model_path(cache_dir=tmp_path / "cache") == folder  # the user's build, kept
    assert json.loads((folder / "world_build.json").read_text())["steps_done"] == 2
    shutil.rmtree(folder)  # as the message says: then the shipped model comes back
    assert world_model_path(cache_dir=tmp_path / "cache") == folder
    assert (folder / "shipped_copy.json").is_file()


def test_min_snr_weights_keep_the_noisiest_step_at_full_weight_and_off_is_plain_mse():
    from dti_fast.world.base import training_loss

    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    per = (pred - target).pow(2).mean(dim=(1, 2, 3))
    acp = torch.tensor([0.0, 0.5, 100 / 101])  # SNR 0 (zero terminal SNR), 1, 100
    assert torch.equal(
        training_loss(pred, target, acp, 0.0, "v_prediction"), torch.nn.functional.mse_loss(pred, target)
    )
    v = training_loss(pred, target, acp, 5.0, "v_prediction")
    torch.testing.assert_close(v, (per * torch.tensor([1.0, 1.0, 6 / 101])).mean(), rtol=1e-5, atol=0)
    eps = training_loss(pred[1:], target[1:], acp[1:], 5.0, "epsilon")
    torch.testing.assert_close(eps, (per[1:] * torch.tensor([1.0, 0.05])).mean(), rtol=1e-5, atol=0)


def test_cell_weights_weigh_each_latent_cell_and_keep_the_mse_scale():
    from dti_fast.world.base import training_loss

    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    acp = torch.tensor([0.3, 0.7])
    err = (pred - target).pow(2)
    # all cells alike: the plain MSE (with and without min-SNR)
    torch.testing.assert_close(
        training_loss(pred, target, acp, 0.0, "v_prediction", torch.full((2, 1, 3, 3), 5.0)),
        torch.nn.functional.mse_loss(pred, target),
    )
    torch.testing.assert_close(
        training_loss(pred, target, acp, 5.0, "v_prediction", torch.ones(2, 1, 3, 3)),
        training_loss(pred, target, acp, 5.0, "v_prediction"),
    )
    # one cell weighted 4x in the first sample: its error counts 4x there, in every channel
    w = torch.ones(2, 1, 3, 3)
    w[0, 0, 1, 2] = 4.0
    first = (err[0] * w[0]).sum() / (4 * w[0].sum())
    expected = (first + err[1].mean()) / 2
    torch.testing.assert_close(training_loss(pred, target, acp, 0.0, "epsilon", w), expected)


def test_the_unets_object_weight_uses_the_object_masks_made_once(tmp_path, monkeypatch):
    from dti_fast.world import base as B

    weights, made = [], []
    real_loss, real_masks = B.training_loss, B.object_masks

    def spy(pred, target, acp_ts, min_snr, prediction, cell_weight=None):
        weights.append(cell_weight)
        return real_loss(pred, target, acp_ts, min_snr, prediction, cell_weight)

    def masks(specs, images=None, check=None):
        made.append(len(specs))
        return real_masks(specs, images, check)

    monkeypatch.setattr(B, "training_loss", spy)
    monkeypatch.setattr(B, "object_masks", masks)
    cfg = B.BuildConfig(images=64, vae_steps=2, steps=3, batch=4, unet_object_weight=3.0, device="cpu", unet_threads=1)
    summary = B.build_base(tmp_path / "m", cfg, log=lambda m: None)
    assert made == [64]  # one set of masks for the VAE stage and the UNet stage
    assert len(weights) == 3 and all(w.shape == (4, 1, 16, 16) for w in weights)
    # a cell counts 1 + 3 x the fraction of its 4x4 pixels under an object
    assert all(float(w.min()) >= 1.0 and float(w.max()) <= 4.0 for w in weights)
    assert any(float(w.max()) > 1.0 for w in weights) and summary["config"]["unet_object_weight"] == 3.0
    # off (the default): the plain MSE, and a further stage on a built model makes no masks
    weights.clear()
    made.clear()
    cfg = B.BuildConfig(images=64, vae_steps=2, steps=2, batch=4, vae_object_weight=0.0, device="cpu", unet_threads=1)
    B.build_base(tmp_path / "plain", cfg, log=lambda m: None)
    assert weights == [None, None] and made == []
    # a further stage that weighs objects makes them although it trains no VAE
    weights.clear()
    cfg = B.BuildConfig(
        images=64, steps=2, batch=4, resume_from=str(tmp_path / "m"), unet_object_weight=1.0, device="cpu"
    )
    B.build_base(tmp_path / "m2", cfg, log=lambda m: None)
    assert made == [64] and len(weights) == 2 and all(w is not None for w in weights)


def test_the_epsilon_fraction_trains_on_sds_schedule_first_then_zero_snr_and_v(tmp_path, monkeypatch):
    from dti_fast.world import base as B

    # a --minutes budget that shortens the stage shortens the epsilon steps in proportion
    cfg = B.BuildConfig(steps=4200, epsilon_fraction=2 / 3)
    assert B.epsilon_steps(cfg, 4200) == 2800 and B.epsilon_steps(cfg, 2100) == 1400
    assert B.epsilon_steps(B.BuildConfig(epsilon_fraction=0.0), 4200) == 0
    assert B.epsilon_steps(B.BuildConfig(epsilon_fraction=0.5, zero_snr=False), 4200) == 0  # all SD's already
    assert B.epsilon_steps(B.BuildConfig(epsilon_fraction=0.9), 2) == 1  # the last step always on zero SNR
    with pytest.raises(ValueError, match=r"epsilon_fraction must be a number in \[0, 1\), got 1.0"):
        B.BuildConfig(epsilon_fraction=1.0).check()
    # the weight average starts afresh where the objective changes (not averaged across it)
    assert B.average_weight(0, 2800, 0.999) == B.average_weight(2800, 2800, 0.999) == pytest.approx(0.9)
    assert B.average_weight(2799, 2800, 0.999) == pytest.approx(1 - 2800 / 2809)
    assert B.average_weight(9990, 10000, 0.999) == pytest.approx(0.001)  # the decay itself, once warm
    assert B.average_weight(2801, 2800, 0.999) == pytest.approx(1 - 2 / 11)

    seen = []
    real = B.training_loss

    def spy(pred, target, acp_ts, min_snr, prediction, cell_weight=None):
        seen.append((prediction, float(acp_ts.min())))
        return real(pred, target, acp_ts, min_snr, prediction, cell_weight)

    monkeypatch.setattr(B, "training_loss", spy)
    lines = []
    cfg = B.BuildConfig(images=64, vae_steps=2, steps=4, batch=4, epsilon_fraction=0.5, device="cpu", unet_threads=1)
    B.build_base(tmp_path / "m", cfg, log=lines.append)
    # SD's schedule keeps some signal at every step (alpha-bar > 0); zero terminal SNR may reach 0
    assert [p for p, _ in seen] == ["epsilon", "epsilon", "v_prediction", "v_prediction"]
    assert all(a > 0 for p, a in seen if p == "epsilon")
    assert any("step 2: the epsilon steps are done" in line for line in lines)
    sched = json.loads((tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["rescale_betas_zero_snr"]


def test_a_setting_an_older_version_did_not_record_counts_as_its_default():
    """A build left unfinished before an upgrade that added a setting continues after it, unless the new
    setting is given another value (or its default is not what builds did before it existed: then that
    value counts); settings that either side lacks otherwise count as changed."""
    from dti_fast.world.base import BuildConfig, build_fingerprint, changed_settings

    now = build_fingerprint(BuildConfig())
    older = {k: v for k, v in now.items() if k != "epsilon_fraction"}
    assert changed_settings(older, now) == []
    assert changed_settings(older, dict(now, epsilon_fraction=0.5)) == ["epsilon_fraction"]
    assert changed_settings(dict(now, lr=1e-3), now) == ["lr"]
    assert changed_settings(now, dict(now, scorer_steps=100)) == ["scorer_steps"]  # not a BuildConfig setting
    assert changed_settings({**now, "retired": 1}, now) == ["retired"]
    # settings whose default differs from what builds did before they existed count as that value
    from dti_fast.world.base import LEGACY_VALUES

    for key, value in LEGACY_VALUES.items():
        without = {k: v for k, v in now.items() if k != key}
        assert changed_settings(without, dict(now, **{key: value})) == [], key
        if getattr(BuildConfig(), key) != value:
            assert changed_settings(without, now) == [key], key


class _PassThroughVAE(torch.nn.Module):
    """encode/decode as an AutoencoderKL has them: the image itself, or (``blank``) a grey image."""

    def __init__(self, blank: bool = False) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.blank = blank

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=torch.zeros_like(z) if self.blank else z)


def test_vae_ceiling_reads_what_the_round_trip_leaves_of_the_gate_scenes():
    # A VAE that returns the render reads as the renders do (the scorer on full captions: 0.99);
    # one that loses the image reads near nothing: the ceiling measures the round trip.
    from dti_fast.world.base import SHIPPED
    from dti_fast.world.scoring import load_scorer
    from dti_fast.world.suite import GATE_SEED, vae_ceiling

    scorer = load_scorer(SHIPPED / "world_scorer")
    exact = vae_ceiling(_PassThroughVAE(), scorer, 24, GATE_SEED)
    assert exact["text_fidelity"] >= 0.95 and exact["reconstruction_mae_0_255"] == 0.0 and exact["scenes"] == 24
    lost = vae_ceiling(_PassThroughVAE(blank=True), scorer, 24, GATE_SEED)
    assert lost["text_fidelity"] < 0.35 and lost["reconstruction_mae_0_255"] > 20


def test_object_masks_cover_the_objects_and_nothing_of_the_background():
    import dataclasses

    from dti_fast.world.base import object_masks, render_set

    specs, images = render_set(12, 3, held=False)
    masks = object_masks(specs)
    assert np.array_equal(object_masks(specs, images), masks)  # the renders given instead of made again
    assert masks.shape == (12, R.SIZE, R.SIZE) and masks.dtype == bool
    for spec, image, mask in zip(specs, images, masks):
        bare = np.asarray(R.render(dataclasses.replace(spec, main=[], second=None)))
        differs = np.abs(image.astype(int) - bare.astype(int)).sum(-1) > 0
        assert differs.any() and mask[differs].all()  # every pixel an object changed is in the mask
        assert not differs[~mask].any() and 0.0 < mask.mean() < 0.6  # the rest is background, as rendered
