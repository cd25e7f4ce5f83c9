"""Each client loads the exports: diffusers itself, and AUTOMATIC1111, ComfyUI and InvokeAI by their rules.

The A1111, ComfyUI and InvokeAI rules are restated here in our own words from their public behaviour
(/work/shared/docs/clients.md): A1111's pickle check of ``.pt`` files and its choice of tensor,
trigger = file name matched token by token in the prompt; ComfyUI's ``embedding:NAME`` lookup and
choice of tensor per encoder; InvokeAI's install probe (the embedding width) and loader. Every test
compares the loaded tensors with the trained vectors bit for bit.
"""

from __future__ import annotations

import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dti_fast.concept_files import load_concepts, read_concept, unload_concepts

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# The clients' rules, restated
# --------------------------------------------------------------------------------------------


class A1111Refused(Exception):
    pass


# Entries A1111 allows in a zip-format .pt: "<folder>/data.pkl", "<folder>/data/<n>", "<folder>/version";
# newer releases also "<folder>/byteorder" and "<folder>/.data/serialization_id".
_A1111_ZIP_OLD = re.compile(r"^[^/]+/(data\.pkl|data/\d+|version)$")
_A1111_ZIP_NEW = re.compile(r"^[^/]+/(data\.pkl|data/\d+|version|byteorder|\.data/serialization_id)$")
_A1111_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(
        ("torch", n)
        for n in (
            "FloatStorage",
            "HalfStorage",
            "IntStorage",
            "LongStorage",
            "DoubleStorage",
            "ByteStorage",
            "float32",
            "BFloat16Storage",
        )
    ),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("__builtin__", "set"),
}


class _A1111Unpickler(pickle.Unpickler):
    """Only the allow-listed globals; storages are not read (an empty one stands in)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _A1111_GLOBALS:
            raise A1111Refused(f"global '{module}/{name}' is forbidden")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if pid[0] != "storage":
            raise A1111Refused(f"persistent id {pid[0]!r}")
        return torch.storage.TypedStorage(_internal=True)


def a1111_check_pt(path: Path, newer: bool = True) -> None:
    """A1111's safety check of a .pt/.bin before torch.load: zip entry names, then the pickle's globals."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            allowed = _A1111_ZIP_NEW if newer else _A1111_ZIP_OLD
            for entry in z.namelist():
                if not allowed.match(entry):
                    raise A1111Refused(f"bad file inside {path.name}: {entry}")
            pkl = [e for e in z.namelist() if e.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise A1111Refused(f"{len(pkl)} data.pkl in {path.name}")
            with z.open(pkl[0]) as fh:
                _A1111Unpickler(fh).load()
    else:  # the legacy stream: magic number, protocol, system info, the object, the storage keys
        with open(path, "rb") as fh:
            unpickler = _A1111Unpickler(fh)
            for _ in range(5):
                unpickler.load()


def a1111_load(path: Path, newer: bool = True) -> tuple[str, Any]:
    """(trigger, vectors) as A1111 registers an embedding file: the trigger is the file name without extension;
    vectors are one tensor, or {"clip_l": ..., "clip_g": ...} for SDXL."""
    if path.suffix.lower() in (".pt", ".bin"):
        a1111_check_pt(path, newer)
        data = torch.load(path, map_location="cpu", weights_only=False)  # what A1111 does after the check
    elif path.suffix.lower() == ".safetensors":
        data = load_file(str(path))
    else:
        raise A1111Refused(f"not an embedding file: {path.name}")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if len(params) != 1:
            raise A1111Refused("string_to_param must hold exactly one tensor")
        vectors: Any = next(iter(params.values()))
    elif "clip_l" in data and "clip_g" in data:
        vectors = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    else:
        tensors = [v for v in data.values() if torch.is_tensor(v)]
        if len(tensors) != 1:
            raise A1111Refused("no single tensor to use")
        vectors = tensors[0]
    return path.stem, vectors


def a1111_fits(vectors: Any, widths: list[int]) -> bool:
    """The embedding's width must match the model's encoder(s), or A1111 skips it."""
    if isinstance(vectors, dict):
        return len(widths) == 2 and [vectors["clip_l"].shape[-1], vectors["clip_g"].shape[-1]] == widths
    return len(widths) == 1 and vectors.shape[-1] == widths[0]


def a1111_replaced(tokenizer, triggers: list[str], prompt: str) -> list[str]:
    """Which embeddings A1111 puts into ``prompt``: a trigger's token sequence found in the prompt's tokens."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    hits = []
    for trigger in triggers:
        want = tokenizer(trigger, add_special_tokens=False)["input_ids"]
        if any(ids[i : i + len(want)] == want for i in range(len(ids))):
            hits.append(trigger)
    return hits


def comfy_find(embeddings_dir: Path, name: str) -> Path | None:
    """ComfyUI's lookup of ``embedding:NAME``: NAME as given, else with .safetensors, .pt, .bin (sub-folders too)."""
    for candidate in [name] + [name + ext for ext in (".safetensors", ".pt", ".bin")]:
        for hit in sorted(embeddings_dir.rglob(candidate)):
            if hit.is_file():
                return hit
    return None


def comfy_load(embeddings_dir: Path, prompt_word: str, embed_key: str, width: int) -> torch.Tensor | None:
    """ComfyUI: rows for one encoder (``clip_l`` SD1 and SDXL's first, ``clip_g`` SDXL's second)."""
    assert prompt_word.startswith("embedding:")
    path = comfy_find(embeddings_dir, prompt_word[len("embedding:") :])
    if path is None:
        return None
    data = (
        load_file(str(path))
        if path.suffix == ".safetensors"
        else torch.load(path, map_location="cpu", weights_only=True)
    )
    if "string_to_param" in data:
        t = next(iter(data["string_to_param"].values()))
    elif embed_key in data:
        t = data[embed_key]
    else:
        t = next(iter(data.values()))
    t = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.unsqueeze(0)
    return t if t.shape[-1] == width else None  # rows of another width are dropped


def invoke_token_dim(path: Path) -> int:
    """InvokeAI's install probe: the embedding width that picks the base model (768 SD1, 1024 SD2, 1280 SDXL)."""
    data = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu")
    if "string_to_token" in data:
        return int(next(iter(data["string_to_param"].values())).shape[-1])
    if "emb_params" in data:
        return int(data["emb_params"].shape[-1])
    if "clip_g" in data:
        return int(data["clip_g"].shape[-1])
    return int(next(iter(data.values())).shape[0])  # diffusers' {token: (n, d)}: the FIRST dimension


def invoke_load(path: Path, widths: list[int]) -> list[torch.Tensor]:
    """InvokeAI's loader, then its SDXL mapping by width: one (n, d) tensor per encoder of the model."""
    data = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu")
    if "string_to_param" in data:
        first, second = next(iter(data["string_to_param"].values())), None
    elif "emb_params" in data:
        first, second = data["emb_params"], None
    elif "clip_g" in data and "clip_l" in data:
        first, second = data["clip_g"], data["clip_l"]
    else:
        first, second = next(iter(data.values())), None
        first = first.unsqueeze(0) if first.dim() == 1 else first
    found = [t for t in (first, second) if t is not None]
    return [next(t for t in found if t.shape[-1] == w) for w in widths]


# --------------------------------------------------------------------------------------------
# Fixtures: trained exports, and one embeddings folder holding every trigger file
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_sdxl2(eval_sdxl_model, tmp_path_factory):
    """DTI and TI on the tiny SDXL model: dog (1 vector) and backpack (2 vectors)."""
    from dti_fast.data import Concept
    from dti_fast.demo import demo_images_dir
    from dti_fast.train import TrainConfig, train

    root = tmp_path_factory.mktemp("clients-sdxl")
    out = {}
    for method in ("dti", "ti"):
        concepts = [
            Concept("dog", demo_images_dir() / "dog", "dog", "dog"),
            Concept("backpack", demo_images_dir() / "backpack", "red backpack", "backpack"),
        ]
        out[method] = train(
            TrainConfig(
                model=str(eval_sdxl_model),
                output_dir=root / method,
                concepts=concepts,
                method=method,
                steps=1,
                batch_size=1,
                resolution=64,
                progress=False,
            )
        )
    assert out["dti"].vectors["backpack"][0].shape[0] == 2
    return out


def _exports(trained_sd, trained_sdxl2):
    """(family, method, name, folder, trigger, vectors per encoder) of every export, rescaled/ included."""
    rows = []
    for family, runs in (("sd", trained_sd), ("sdxl", trained_sdxl2)):
        for method, result in runs.items():
            for name, folder in result.concept_dirs.items():
                trigger = f"{name}-{method}"
                rows.append((family, method, name, folder, trigger, result.vectors[name]))
                if (folder / "rescaled").is_dir():
                    c = read_concept(folder / "rescaled")
                    rows.append((family, "ti-rescaled", name, folder / "rescaled", f"{trigger}-rescaled", c.vectors))
    return rows


@pytest.fixture(scope="module")
def embeddings_dir(trained_sd, trained_sdxl2, tmp_path_factory):
    """Every export's trigger-named files copied into ONE folder per family, as users install them."""
    root = tmp_path_factory.mktemp("embeddings")
    copied = {"sd": 0, "sdxl": 0}
    for family, _, _, folder, trigger, _ in _exports(trained_sd, trained_sdxl2):
        for f in sorted(folder.glob(f"{trigger}.*")):
            (root / family).mkdir(exist_ok=True)
            assert not (root / family / f.name).exists(), f"{f.name} would overwrite another export"
            shutil.copy(f, root / family / f.name)
            copied[family] += 1
    return root, copied


def _widths(pipe_or_parts) -> list[int]:
    encs = [pipe_or_parts.text_encoder] + (
        [pipe_or_parts.text_encoder_2] if getattr(pipe_or_parts, "text_encoder_2", None) is not None else []
    )
    return [int(e.get_input_embeddings().weight.shape[1]) for e in encs]


def _exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert torch.equal(a, b), (a - b).abs().max()


# --------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_pipe(eval_sd_model):
    from dti_fast.generate import load_pipeline

    return load_pipeline(str(eval_sd_model), device="cpu")


@pytest.fixture(scope="module")
def xl_pipe(eval_sdxl_model):
    from dti_fast.generate import load_pipeline

    return load_pipeline(str(eval_sdxl_model), device="cpu")


def _rows(tok, enc, word: str, n: int) -> torch.Tensor:
    tokens = [word] + [f"{word}_{i}" for i in range(1, n)]
    ids = tok.convert_tokens_to_ids(tokens)
    assert tok.unk_token_id not in ids
    return enc.get_input_embeddings().weight[ids].detach()


@pytest.mark.parametrize("method", ["dti", "ti"])
def test_diffusers_plain_load_textual_inversion_of_the_sd_files(trained_sd, sd_pipe, method):
    """The A1111 .pt loads with a bare load_textual_inversion(path): its name is the trigger, not a vocabulary word."""
    result = trained_sd[method]
    for name, folder in result.concept_dirs.items():
        v = result.vectors[name][0]
        trigger = f"{name}-{method}"
        for path, word in (
            (folder / f"{trigger}.pt", trigger),
            (folder / "learned_embeds.safetensors", f"<{name}>"),
            (folder / f"{trigger}.safetensors", trigger),
        ):
            kwargs = {"token": trigger} if path.suffix == ".safetensors" and word == trigger else {}
            sd_pipe.load_textual_inversion(str(path), **kwargs)
            try:
                _exact(_rows(sd_pipe.tokenizer, sd_pipe.text_encoder, word, v.shape[0]), v)
                if v.shape[0] > 1:  # the bare word expands to every vector
                    assert f"{word}_1" in sd_pipe.maybe_convert_prompt(f"a photo of {word}", sd_pipe.tokenizer)
            finally:
                sd_pipe.unload_textual_inversion(tokens=[word] + [f"{word}_{i}" for i in range(1, v.shape[0])])


def test_diffusers_sdxl_file_needs_our_loader(trained_sdxl2, xl_pipe):
    folder = trained_sdxl2["dti"].concept_dirs["backpack"]
    with pytest.raises(ValueError, match="Loaded state dictionary is incorrect"):
        xl_pipe.load_textual_inversion(str(folder / "backpack-dti.safetensors"))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("method", ["dti", "ti"])
def test_load_concepts_every_export_file_sd_and_sdxl(trained_sd, trained_sdxl2, sd_pipe, xl_pipe, family, method):
    result = (trained_sd if family == "sd" else trained_sdxl2)[method]
    pipe = sd_pipe if family == "sd" else xl_pipe
    encoders = [(pipe.tokenizer, pipe.text_encoder)] + (
        [(pipe.tokenizer_2, pipe.text_encoder_2)] if family == "sdxl" else []
    )
    for name, folder in result.concept_dirs.items():
        trigger = f"{name}-{method}"
        sources = [(folder, f"<{name}>"), (folder / f"{trigger}.safetensors", trigger)]
        if family == "sd":
            sources += [(folder / f"{trigger}.pt", trigger), (folder / "learned_embeds.safetensors", f"<{name}>")]
        for source, word in sources:
            concepts = [read_concept(source)]
            words = load_concepts(pipe, source)
            try:
                assert words == [word]
                for (tok, enc), v in zip(encoders, result.vectors[name]):
                    _exact(_rows(tok, enc, word, v.shape[0]), v)
            finally:
                unload_concepts(pipe, concepts)
            assert word not in pipe.tokenizer.get_vocab()


def test_load_concepts_several_at_once_and_from_the_package(trained_sd, sd_pipe):
    import dti_fast

    dti = trained_sd["dti"]
    a, b = dti.concept_dirs["dog"], dti.concept_dirs["backpack"] / "backpack-dti.pt"
    words = dti_fast.load_concepts(sd_pipe, a, read_concept(b))
    try:
        assert words == ["<dog>", "backpack-dti"]
        _exact(_rows(sd_pipe.tokenizer, sd_pipe.text_encoder, "backpack-dti", 2), dti.vectors["backpack"][0])
    finally:
        unload_concepts(sd_pipe, [read_concept(a), read_concept(b)])


# --------------------------------------------------------------------------------------------
# AUTOMATIC1111
# --------------------------------------------------------------------------------------------


def test_a1111_check_refuses_torch2_zip_files_and_accepts_legacy_ones(tmp_path):
    """The restated check can fail: torch's default zip container is refused, the legacy stream passes."""
    obj = {"string_to_param": {"*": torch.randn(1, 8)}, "name": "x-emb"}
    torch.save(obj, tmp_path / "zip.pt")
    names = zipfile.ZipFile(tmp_path / "zip.pt").namelist()
    for newer in (True, False):
        with pytest.raises(
            A1111Refused, match=r"bad file inside zip.pt: .*(\.format_version|\.storage_alignment|byteorder)"
        ):
            a1111_check_pt(tmp_path / "zip.pt", newer=newer)
    assert any(n.endswith("/.format_version") for n in names)
    torch.save(obj, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    a1111_check_pt(tmp_path / "legacy.pt", newer=False)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save(
        {"string_to_param": {"*": torch.zeros(1, 8)}, "x": Evil()},
        tmp_path / "evil.pt",
        _use_new_zipfile_serialization=False,
    )
    with pytest.raises(A1111Refused, match="forbidden"):
        a1111_check_pt(tmp_path / "evil.pt")


@pytest.mark.parametrize("newer", [True, False], ids=["a1111-1.10", "a1111-old"])
def test_a1111_loads_every_trigger_file(trained_sd, trained_sdxl2, embeddings_dir, eval_sd_model, newer):
    from dti_fast.models import load_model_parts

    root, copied = embeddings_dir
    widths = {"sd": [32], "sdxl": [32, 64]}
    seen = 0
    for family, method, name, folder, trigger, vectors in _exports(trained_sd, trained_sdxl2):
        files = sorted((root / family).glob(f"{trigger}.*"))
        assert [f.suffix for f in files] == ([".pt", ".safetensors"] if family == "sd" else [".safetensors"])
        for f in files:
            word, got = a1111_load(f, newer=newer)
            assert word == trigger
            assert a1111_fits(got, widths[family]) and not a1111_fits(got, widths["sdxl" if family == "sd" else "sd"])
            if family == "sd":
                _exact(got, vectors[0])
            else:
                _exact(got["clip_l"], vectors[0])
                _exact(got["clip_g"], vectors[1])
            seen += 1
    assert seen == sum(copied.values())
    # The trigger replaces only itself: "dog" in a prompt stays the word dog.
    tok = load_model_parts(str(eval_sd_model)).tokenizers[0]
    triggers = sorted({f.stem for f in (root / "sd").iterdir()})
    assert a1111_replaced(tok, triggers, "a photo of a dog with a backpack") == []
    assert a1111_replaced(tok, triggers, "a photo of dog-dti with a backpack-ti") == ["backpack-ti", "dog-dti"]
    assert a1111_replaced(tok, ["dog"], "a photo of a dog") == ["dog"]  # what a file named dog.pt did


# --------------------------------------------------------------------------------------------
# ComfyUI
# --------------------------------------------------------------------------------------------


def test_comfyui_embedding_name_lookup_and_keys(trained_sd, trained_sdxl2, embeddings_dir):
    root, _ = embeddings_dir
    for family, method, name, folder, trigger, vectors in _exports(trained_sd, trained_sdxl2):
        d = root / family
        if family == "sd":
            _exact(comfy_load(d, f"embedding:{trigger}", "clip_l", 32), vectors[0])  # the .safetensors (first)
            _exact(comfy_load(d, f"embedding:{trigger}.pt", "clip_l", 32), vectors[0])
            assert comfy_load(d, f"embedding:{trigger}", "clip_l", 64) is None  # wrong model: dropped
        else:
            _exact(comfy_load(d, f"embedding:{trigger}", "clip_l", 32), vectors[0])
            _exact(comfy_load(d, f"embedding:{trigger}", "clip_g", 64), vectors[1])
        assert comfy_load(d, f"embedding:{name}", "clip_l", 32) is None  # the trigger is the name to type


# --------------------------------------------------------------------------------------------
# InvokeAI
# --------------------------------------------------------------------------------------------


def test_invokeai_installs_and_loads_the_trigger_files_not_the_diffusers_ones(
    trained_sd, trained_sdxl2, embeddings_dir
):
    root, _ = embeddings_dir
    widths = {"sd": [32], "sdxl": [32, 64]}
    for family, method, name, folder, trigger, vectors in _exports(trained_sd, trained_sdxl2):
        for f in sorted((root / family).glob(f"{trigger}.*")):
            assert invoke_token_dim(f) == widths[family][-1]  # the probe finds the model's width
            for got, v in zip(invoke_load(f, widths[family]), vectors):
                _exact(got, v)
        n = vectors[0].shape[0]
        if n > 1:  # why the README points InvokeAI at the trigger files: the probe reads n, not the width
            assert invoke_token_dim(folder / "learned_embeds.safetensors") == n
