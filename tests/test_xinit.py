"""CrossInit (``--init xinit``): the learned rows start from the text encoder's contextual output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dti_fast.data import Concept, load_concept_images
from dti_fast.demo import demo_images_dir
from dti_fast.distributed import DistContext
from dti_fast.embedding import CONTEXTUAL_STATES, contextual_states
from dti_fast.testing import tiny_model_path
from dti_fast.train import TrainConfig, TrainingJob, train

pytestmark = pytest.mark.usefixtures("one_thread")

INITS = {"dog": "dog", "backpack": "red backpack"}


def _config(model: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        output_dir=out,
        concepts=[Concept(n, demo_images_dir() / n, INITS[n]) for n in ("dog", "backpack")],
        steps=2,
        batch_size=1,
        resolution=64,
        checkpoint_every=100,
        progress=False,
        init="xinit",
    )
    base.update(kw)
    return TrainConfig(**base)


def _job(cfg: TrainConfig) -> TrainingJob:
    images = [load_concept_images(c, cfg.resolution) for c in cfg.concepts]
    return TrainingJob(cfg, images, DistContext(), Path(cfg.output_dir) / "checkpoints")


def _by_hand(model: Path, family: str) -> list[dict[str, torch.Tensor]]:
    """Per encoder, per concept: the last hidden state at the initializer's pieces, from freshly loaded parts."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    subs = [("tokenizer", "text_encoder", CLIPTextModel)]
    if family == "sdxl":
        subs.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    out = []
    for tok_dir, enc_dir, cls in subs:
        tok = CLIPTokenizer.from_pretrained(model / tok_dir)
        enc = cls.from_pretrained(model / enc_dir).eval()
        rows = {}
        for name, words in INITS.items():
            pieces = tok(words, add_special_tokens=False).input_ids
            ids = [tok.bos_token_id, *pieces, tok.eos_token_id]
            ids += [tok.pad_token_id] * (tok.model_max_length - len(ids))
            with torch.no_grad():
                hidden = enc(torch.tensor([ids])).last_hidden_state[0]
            rows[name] = hidden[1 : 1 + len(pieces)].float()
        out.append(rows)
    return out


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_xinit_rows_are_the_encoders_output_dti_unit_at_mstar_ti_at_its_norm(family, tmp_path):
    model = tiny_model_path(family)
    expected = _by_hand(model, family)
    dti = _job(_config(model, tmp_path / "dti"))
    ti = _job(_config(model, tmp_path / "ti", method="ti"))
    for e, rows in enumerate(expected):
        for i, name in enumerate(("dog", "backpack")):
            want = rows[name]
            assert want.shape[0] == (2 if name == "backpack" else 1)  # piece i -> vector i
            # DTI: unit rows along the output's direction; the vector used is m* times that; the prior too.
            v = dti.embeddings[e].rows[i].detach()
            torch.testing.assert_close(v.norm(dim=-1), torch.ones(len(want)), rtol=0, atol=1e-6)
            torch.testing.assert_close(v, F.normalize(want, dim=-1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dti.embeddings[e].priors[i], F.normalize(want, dim=-1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                dti.embeddings[e].vectors(i).norm(dim=-1), torch.full((len(want),), dti.embeddings[e].scale)
            )
            # TI: the output itself, at its own norm (far from the vocabulary's).
            torch.testing.assert_close(ti.embeddings[e].rows[i].detach(), want, rtol=1e-5, atol=1e-5)
            vocab = dti.embeddings[e].scale
            assert (want.norm(dim=-1) > 2 * vocab).all(), (want.norm(dim=-1), vocab)
            # Not the token start: that is the initializer's input embedding.
            token = dti.embeddings[e].base.weight.detach()[dti.tokens[e][i].init_ids].float()
            assert not torch.allclose(F.normalize(token, dim=-1), v, atol=1e-3)


def test_xinit_trains_and_is_in_the_fingerprint_job_files_and_help(tmp_path):
    from dti_fast.cli import build_parser
    from dti_fast.train.config import read_job_file

    model = tiny_model_path("sd")
    result = train(_config(model, tmp_path / "run"))
    m_star = result.scales[0]
    for vectors in result.vectors.values():
        torch.testing.assert_close(
            vectors[0].norm(dim=-1), torch.full((vectors[0].shape[0],), m_star), rtol=1e-5, atol=0
        )
    cfg_x, cfg_t = _config(model, tmp_path / "a"), _config(model, tmp_path / "a", init="token")
    c = cfg_x.concepts[0]
    assert cfg_x.concept_fingerprint(c) != cfg_t.concept_fingerprint(c)
    job = tmp_path / "job.toml"
    job.write_text(f'model = "{model}"\noutput_dir = "o"\ninit = "xinit"\n')
    assert read_job_file(job)["init"] == "xinit"
    job.write_text(f'model = "{model}"\noutput_dir = "o"\ninit = "crossinit"\n')
    with pytest.raises(Exception, match="xinit"):
        read_job_file(job)
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "xinit" in text and "CrossInit" in text


def test_an_encoder_kind_without_a_contextual_function_is_refused_by_name():
    from dti_fast.models import load_model_parts

    parts = load_model_parts(str(tiny_model_path("sd")))
    tok, enc = parts.tokenizers[0], parts.text_encoders[0]
    ids = tok("dog", add_special_tokens=False).input_ids
    saved = CONTEXTUAL_STATES.pop("clip_text_model")
    try:
        with pytest.raises(ValueError, match="no contextual-state function.*clip_text_model.*--init token"):
            contextual_states(tok, enc, "dog", ids)
    finally:
        CONTEXTUAL_STATES["clip_text_model"] = saved
    assert contextual_states(tok, enc, "dog", ids).shape == (1, enc.config.hidden_size)
