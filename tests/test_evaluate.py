"""The metrics on tiny random-weight DINOv2 / SigLIP / CLIP models the tests build (no downloads)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dti_fast.demo import demo_images_dir
from dti_fast.evaluate import (
    ClipScorer,
    DinoScorer,
    Evaluator,
    SiglipScorer,
    aggregate,
    apply_mask,
    evaluate_generated,
    load_references,
)
from dti_fast.generate import ImageRecord
from dti_fast.io import write_json
from dti_fast.testing import is_tiny_metric_model


@pytest.fixture(scope="module")
def scorers(tiny_metrics):
    return {
        "dino": DinoScorer(tiny_metrics["dino"], device="cpu"),
        "siglip": SiglipScorer(tiny_metrics["siglip"], device="cpu"),
        "clip": ClipScorer(tiny_metrics["clip"], device="cpu"),
    }


@pytest.fixture(scope="module")
def photos():
    return load_references(demo_images_dir() / "dog")


def _noise(seed=0, size=96):
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def test_processors_are_pil_and_models_load_from_the_folders(scorers, tiny_metrics):
    for s in scorers.values():
        assert type(s.processor).__name__.endswith("Pil"), type(s.processor)
    assert type(scorers["dino"].model).__name__ == "Dinov2Model"
    assert type(scorers["siglip"].model).__name__ == "SiglipModel"
    assert type(scorers["clip"].model).__name__ == "CLIPModel"
    try:
        import google.protobuf  # noqa: F401
        import sentencepiece  # noqa: F401
    except ImportError:
        expected = "CLIPTokenizer"  # the documented stand-in without sentencepiece
    else:
        expected = "SiglipTokenizer"
    assert type(scorers["siglip"].tokenizer).__name__ == expected
    assert all(is_tiny_metric_model(p) for p in tiny_metrics.values())


def test_image_vs_itself_scores_one_and_vs_noise_less(scorers, photos):
    dino, clip = scorers["dino"], scorers["clip"]
    for sim in (dino.similarity, clip.clip_i):
        same = sim([photos[0]], [photos[0]])
        noise = sim([_noise()], [photos[0]])
        assert float(same) == pytest.approx(1.0, abs=1e-5)
        assert float(noise) < float(same) - 1e-3
    # Against several references: the mean of the per-reference cosines.
    f = dino.image_features([photos[1]] + photos[:3])
    expected = float((f[0] @ f[1:].T).mean())
    assert float(dino.similarity([photos[1]], photos[:3])) == pytest.approx(expected, abs=1e-6)
    assert float(dino.similarity([photos[0]], photos[:3])) > float(dino.similarity([_noise(1)], photos[:3]))


def test_dino_feature_is_the_cls_token(scorers, photos):
    dino = scorers["dino"]
    px = dino.processor(images=[photos[0]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = dino.model(pixel_values=px).last_hidden_state[0, 0]
    torch.testing.assert_close(dino.image_features([photos[0]])[0], cls / cls.norm(), atol=1e-6, rtol=0)


def test_siglip_score_is_the_models_sigmoid_logit(scorers, photos):
    s = scorers["siglip"]
    images = [photos[0], photos[1], _noise()]
    texts = ["a photo of a dog", "a red backpack in the snow", "a cat on the beach"]
    bias = float(s.model.logit_bias)
    with torch.no_grad():
        s.model.logit_bias.fill_(-1.5)  # both the scale and the bias must enter the score
    try:
        scores = s.score(images, texts)
        enc = s.tokenizer(texts, padding="max_length", max_length=s.max_length, truncation=True, return_tensors="pt")
        px = s.processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = s.model(input_ids=enc["input_ids"], pixel_values=px).logits_per_image
    finally:
        with torch.no_grad():
            s.model.logit_bias.fill_(bias)
    torch.testing.assert_close(scores, torch.sigmoid(logits.diagonal()), atol=1e-5, rtol=0)
    assert ((scores > 0) & (scores < 1)).all()
    # Ranking candidate texts for one image: the score orders them as the cosine does.
    cands = ["a dog", "a cat", "a clock on a table", "a backpack", "a purple dog in the jungle"]
    sc = s.score([photos[0]] * len(cands), cands)
    cos = (s.image_features([photos[0]]) @ s.text_features(cands).T)[0]
    assert torch.argsort(sc).tolist() == torch.argsort(cos).tolist()


def test_siglip_text_is_padded_to_the_models_length(scorers):
    s = scorers["siglip"]
    calls = []
    real = s.tokenizer

    class Spy:
        def __call__(self, texts, **kw):
            calls.append(kw)
            return real(texts, **kw)

    s.tokenizer = Spy()
    try:
        s.text_features(["a dog"])
    finally:
        s.tokenizer = real
    assert (
        calls[0]["padding"] == "max_length"
        and calls[0]["max_length"] == s.model.config.text_config.max_position_embeddings
    )


def test_clip_t_is_the_cosine_of_the_models_embeddings(scorers, photos):
    c = scorers["clip"]
    texts = ["a photo of a dog", "a cat"]
    got = c.clip_t(photos[:2], texts)
    enc = c.tokenizer(texts, padding=True, return_tensors="pt")
    px = c.processor(images=photos[:2], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = c.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px)
    expected = out.logits_per_image.diagonal() / c.model.logit_scale.exp()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_aggregate_is_per_subject_then_mean_over_subjects():
    r = aggregate(
        {"a": {"image": [1.0, 0.0, 0.5, 0.5], "text": [0.2, 0.4, 0.6, 0.8]}, "b": {"image": [0.9], "text": [0.1]}}
    )
    assert r["subjects"]["a"] == {"image": 0.5, "text": pytest.approx(0.5)}
    assert r["mean"]["image"] == pytest.approx((0.5 + 0.9) / 2)  # not (2.0 + 0.9) / 5
    assert r["mean"]["text"] == pytest.approx((0.5 + 0.1) / 2)
    assert r["images"] == {"a": 4, "b": 1}
    assert math.isnan(aggregate({"a": {"image": [float("nan")]}})["mean"]["image"])


def test_masks_blank_the_background(tmp_path):
    img = Image.new("RGB", (4, 4), (200, 100, 50))
    mask = Image.new("L", (4, 4), 0)
    mask.putpixel((1, 1), 255)
    out = np.asarray(apply_mask(img, mask, fill=(0, 0, 0)))
    assert tuple(out[1, 1]) == (200, 100, 50) and tuple(out[0, 0]) == (0, 0, 0)
    refs = tmp_path / "refs"
    masks = tmp_path / "masks"
    refs.mkdir(), masks.mkdir()
    img.save(refs / "00.jpg")
    mask.save(masks / "00.png")
    loaded = load_references(refs, masks)
    assert np.asarray(loaded[0])[0, 0].tolist() == [0, 0, 0]
    img.save(refs / "01.jpg")
    with pytest.raises(FileNotFoundError, match="no mask for reference .*01.jpg"):
        load_references(refs, masks)


def test_masked_references_change_the_subject_score(scorers, tmp_path):
    dino = scorers["dino"]
    photo = load_references(demo_images_dir() / "clock")[0]
    w, h = photo.size
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    masked = apply_mask(photo, mask)
    assert float(dino.similarity([photo], [photo])) > float(dino.similarity([photo], [masked]))


def test_evaluate_generated_scores_the_class_noun_text(tmp_path, tiny_metrics, photos):
    gen = tmp_path / "gen"
    records = []
    for k, img in enumerate([photos[0], _noise(3)]):
        f = f"dog/p000_s{k}.png"
        (gen / "dog").mkdir(parents=True, exist_ok=True)
        img.save(gen / f)
        records.append(
            ImageRecord("dog", 0, "a {} in the snow", "a <dog> in the snow", "a dog in the snow", k, f).to_json()
        )
    write_json({"records": records}, gen / "images.json")
    seen = []
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(str(tiny_metrics["siglip"]))

    class Spy:
        def __call__(self, texts, **kw):
            seen.extend(texts)
            return real(texts, **kw)

    ev = Evaluator(
        dino=tiny_metrics["dino"],
        siglip=tiny_metrics["siglip"],
        clip=tiny_metrics["clip"],
        device="cpu",
        siglip_tokenizer=Spy(),
    )
    result = evaluate_generated(gen, {"dog": [photos[0]]}, ev)
    assert seen == ["a dog in the snow", "a dog in the snow"]
    per = {r["file"]: r for r in result["per_image"]}
    assert per["dog/p000_s0.png"]["image"] == pytest.approx(1.0, abs=1e-5)
    assert per["dog/p000_s0.png"]["scored_text"] == "a dog in the snow"
    assert per["dog/p000_s1.png"]["image"] < 0.999
    assert result["subjects"]["dog"]["image"] == pytest.approx(
        (per["dog/p000_s0.png"]["image"] + per["dog/p000_s1.png"]["image"]) / 2
    )
    assert set(result["mean"]) == {"image", "text", "clip_i", "clip_t"}
    json.dumps(result)  # serializable as is
    with pytest.raises(ValueError, match="no reference images for concept"):
        evaluate_generated(gen, {}, ev)


def test_loading_errors_are_clear(tiny_metrics, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DinoScorer(tmp_path / "missing", device="cpu")
    with pytest.raises(ValueError, match="image-text model.*DINOv2"):
        DinoScorer(tiny_metrics["clip"], device="cpu")
    with pytest.raises(ValueError, match="not a SigLIP model"):
        SiglipScorer(tiny_metrics["clip"], device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="hf download"):
        ClipScorer("nobody-here/no-such-clip-model", device="cpu")
    with pytest.raises(ValueError, match="unknown metric"):
        Evaluator(metrics=["image", "fid"])
