"""LLaVA-Rad backend on the tiny random checkpoint in the official file layout (CPU, float32):
fast path (SDPA + one packed forward per pass + row capture) vs the full-prompt eager
reference, the splice position of the image span, the LoRA merge, the loader's refusals,
preprocessing vs torchvision, and the tokenisation vs the official slow (sentencepiece) path."""

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import max_diff
from PIL import Image
from torch._dynamo.utils import counters

import llava_rad_medical_only as lr
from archive.reference_llava_rad import eager_attention, llava_rad_reference_score, reference_query_positions
from llava_rad_medical_only import LLaVARadLoadError, LLaVARadMedical, MedicalAttentionConfig
from medvlm.core.geometry import shortest_side_center_crop_geometry
from medvlm.core.tiny_llava_rad import write_tiny_llava_rad

QUESTIONS = [
    "Is there a pleural effusion?",
    "Does this chest X-ray show cardiomegaly in a patient with a history of heart failure?",
    "Is there a pneumothorax?",
]
FINDINGS = ["pleural effusion", "cardiomegaly", "pneumothorax"]
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llava_rad(tmp_path_factory.mktemp("llava_rad_tiny"), seed=0)


_BACKENDS: dict = {}


def _backend(tiny, **cfg) -> LLaVARadMedical:
    """A backend loaded through the public API (cached per config within the module)."""
    key = (tiny, tuple(sorted(cfg.items())))
    if key not in _BACKENDS:
        config = MedicalAttentionConfig(**{"colormap": "hot", "attention_head_mode": "mean", **cfg})
        _BACKENDS[key] = LLaVARadMedical(config=config).load_model(*tiny, device="cpu")
        _BACKENDS[key].keep_logits = True
    return _BACKENDS[key]


@pytest.fixture(scope="module")
def backend(tiny):
    return _backend(tiny)


_REFS: dict = {}


def _reference(tiny, image, question):
    """The eager full-prompt forward of one question (the weights do not depend on the scoring
    config, so one forward serves every query mode and head mode)."""
    key = (tiny, question)
    if key not in _REFS:
        _REFS[key] = llava_rad_reference_score(_backend(tiny), image, question)
    return _REFS[key]


def _ref_maps(ref, positions, head_mode):
    """Reference rows of the given absolute query positions -> ([L, N] or [L, H, N] image maps,
    [L] image mass), by plain means."""
    p0, p1 = ref["image_span"]
    start = p1  # suffix_rows start right after the image
    maps, mass = [], []
    for layer in sorted(ref["suffix_rows"]):
        rows = ref["suffix_rows"][layer][:, [q - start for q in positions], p0:p1]  # [H, nq, N]
        per_head = rows.mean(1)  # over query tokens
        maps.append(per_head if head_mode == "none" else per_head.mean(0))
        mass.append(rows.sum(-1).mean())
    return torch.stack(maps), torch.stack(mass)


# -- fast path == eager reference ------------------------------------------------------------
@pytest.mark.parametrize(
    "head_mode,query_mode", [("mean", "answer"), ("none", "answer"), ("none", "question"), ("mean", "finding")]
)
def test_batched_prefix_scoring_equals_full_prompt_eager(tiny, rgb_image, head_mode, query_mode):
    b = _backend(tiny, attention_head_mode=head_mode, query_mode=query_mode)
    lengths = {len(b.tokenize(q).suffix_ids) for q in QUESTIONS}
    assert len(lengths) == len(QUESTIONS), f"the batch should mix suffix lengths, got {lengths}"
    scores = b.score(rgb_image, QUESTIONS, FINDINGS)
    assert [s.question for s in scores] == QUESTIONS
    for i, (q, s) in enumerate(zip(QUESTIONS, scores, strict=True)):
        ref = _reference(tiny, rgb_image, q)
        d = max_diff(s.extra["logits"], ref["logits"])
        assert d <= TOL, f"question {i}: logits differ by {d:.3g}"
        assert s.layers == (0, 1, 2)
        p0, p1 = ref["image_span"]
        expected_positions = reference_query_positions(
            b.tokenizer, ref["prompt"], q, FINDINGS[i], query_mode, p0, p1 - p0
        )
        positions = [s.extra["prefix_len"] + j for j in s.extra["query_positions"]]
        assert positions == expected_positions, "query tokens differ from the reference's"
        assert s.n_query_tokens == len(positions)
        if query_mode == "answer":
            assert positions == [ref["n_tokens"] - 1]
        elif query_mode == "question":
            assert s.n_query_tokens > 3
        maps, mass = _ref_maps(ref, positions, head_mode)
        for li, layer in enumerate(s.layers):
            d = max_diff(s.attention[li], maps[li])
            assert d <= TOL, f"question {i} layer {layer} ({head_mode}, {query_mode}): rows differ by {d:.3g}"
        d = max_diff(s.image_mass, mass)
        assert d <= TOL, f"question {i}: image mass differs by {d:.3g}"
        # the reference's rows are far from uniform: the comparison can fail
        assert float(maps.max()) > 20 * float(maps.mean()), "attention is nearly uniform: weak test"


def test_image_span_sits_at_the_placeholder_after_the_splice(backend, rgb_image):
    """Plant a strong key at image token j (via the projector output): the backend's map peaks at
    j, the reference's full row peaks at absolute column p + j, and pre-splice indexing is wrong."""
    q = QUESTIONS[0]
    toks = backend.tokenize(q)
    p, n = toks.placeholder_index, backend.n_image_tokens
    assert toks.input_ids()[p] == lr.IMAGE_TOKEN_INDEX
    t_total = p + n + len(toks.suffix_ids)
    j = 700
    # find an embedding whose layer-0 key at position p + j the answering query attends to
    emb_last = backend.model.get_input_embeddings().weight[toks.suffix_ids[-1]].detach()
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(emb_last.shape[0], generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=0.2)
    with eager_attention(backend.model), torch.enable_grad():
        for _ in range(60):
            out = backend.model.model(
                inputs_embeds=torch.stack([v, emb_last])[None],
                position_ids=torch.tensor([[p + j, t_total - 1]]),
                output_attentions=True,
            )
            a = out.attentions[0][0, :, 1, 0]
            loss = -(torch.log(a) - torch.log1p(-a)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    planted = v.detach().clone()

    def plant(module, inputs, output):
        output = output.clone()
        output[:, j] = planted
        return output

    handle = backend.projector.register_forward_hook(plant)
    try:
        s = backend.score(rgb_image, [q])[0]
        ref = llava_rad_reference_score(backend, rgb_image, q)
    finally:
        handle.remove()
    assert ref["image_span"] == (p, p + n) and s.extra["image_span"] == [p, p + n]
    layer0 = s.attention[0]
    assert int(np.argmax(layer0)) == j, f"the backend's map peaks at {int(np.argmax(layer0))}, planted at {j}"
    assert layer0[j] > 0.2 and layer0[j] > 5 * np.partition(layer0, -2)[-2], "the planted key is not strong"
    row = ref["rows"][0].mean(0)[0]  # [T] over all keys, head mean
    assert int(row.argmax()) == p + j, f"the reference row peaks at {int(row.argmax())}, expected {p + j}"
    assert max_diff(layer0, row[p : p + n]) <= TOL
    # the classic bugs read other columns: the planted spike moves or vanishes
    assert max_diff(layer0, row[:n]) > 0.1  # image assumed to start at 0
    assert max_diff(layer0, row[p + 1 : p + 1 + n]) > 0.1  # placeholder counted as a token


# -- loading ---------------------------------------------------------------------------------
def test_merged_weights_equal_w_plus_scaled_ba(tiny, backend):
    from safetensors.torch import load_file

    model_path, base = tiny
    acfg = json.loads((Path(model_path) / "adapter_config.json").read_text())
    scale = acfg["lora_alpha"] / acfg["r"]
    base_sd = load_file(str(Path(base) / "model.safetensors"))
    lora = torch.load(Path(model_path) / "adapter_model.bin", weights_only=True)
    merged = dict(backend.model.named_parameters())
    n = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0] + ".weight"
        expected = base_sd[name] + scale * (b @ a)
        assert max_diff(merged[name], expected) <= 1e-6, name
        assert (scale * (b @ a)).abs().max() > 1e-2, f"{name}: the LoRA delta is negligible"
        n += 1
    assert n == 3 * 7 == backend.load_report["lora"]["merged_modules"]
    untouched = "model.embed_tokens.weight"
    assert max_diff(merged[untouched], base_sd[untouched]) == 0.0


def test_merge_matches_peft_merge_and_unload(tiny, backend):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model_path, base = tiny
    ref = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    ref = PeftModel.from_pretrained(ref, model_path).merge_and_unload()
    ours = dict(backend.model.named_parameters())
    for name, w in ref.named_parameters():
        assert max_diff(ours[name], w) <= 1e-6, name


def _copy(tiny, tmp_path) -> tuple[Path, Path]:
    model_path, base = tiny
    m, b = tmp_path / "llava-rad", tmp_path / "vicuna"
    shutil.copytree(model_path, m)
    shutil.copytree(base, b)
    return m, b


def _load(m, b):
    return LLaVARadMedical().load_model(str(m), str(b), device="cpu")


@pytest.mark.parametrize(
    "name",
    [
        "config.json",
        "adapter_config.json",
        "adapter_model.bin",
        "non_lora_trainables.bin",
        "biomedclipcxr_518.json",
        "biomedclipcxr_518_checkpoint.pt",
    ],
)
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_file_is_named(tiny, tmp_path, name, damage):
    m, b = _copy(tiny, tmp_path)
    if damage == "missing":
        (m / name).unlink()
    else:
        (m / name).write_bytes(b"\x00not what it should be\xff" * 3)
    with pytest.raises(LLaVARadLoadError) as err:
        _load(m, b)
    assert name in str(err.value), str(err.value)


def test_missing_base_weights_fail(tiny, tmp_path):
    m, b = _copy(tiny, tmp_path)
    (b / "model.safetensors").unlink()
    with pytest.raises(LLaVARadLoadError, match="vicuna"):
        _load(m, b)


def test_unsafe_pickle_is_refused(tiny, tmp_path):
    m, b = _copy(tiny, tmp_path)
    sd = torch.load(m / "non_lora_trainables.bin", weights_only=True)
    sd["args"] = argparse.Namespace(lr=1e-4)  # training scripts pickle such objects: not weights
    torch.save(sd, m / "non_lora_trainables.bin")
    with pytest.raises(LLaVARadLoadError, match="non_lora_trainables.bin.*weights_only=True"):
        _load(m, b)


def _edit_json(path: Path, **changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if isinstance(v, dict):
            d[k].update(v)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


@pytest.mark.parametrize(
    "file,changes,fact",
    [
        ("config.json", {"mm_vision_select_layer": -1}, "mm_vision_select_layer: expected -2.*found -1"),
        ("config.json", {"mm_projector_type": "linear"}, "mm_projector_type: expected 'mlp2x_gelu'.*'linear'"),
        ("config.json", {"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature"),
        ("config.json", {"mm_use_im_patch_token": True}, "mm_use_im_patch_token"),
        ("config.json", {"mm_hidden_size": 48}, "mm_hidden_size.*48.*32"),
        ("biomedclipcxr_518.json", {"vision_cfg": {"image_size": 224}}, "image_size: expected 518"),
        ("biomedclipcxr_518.json", {"vision_cfg": {"timm_model_name": "vit_base_patch16_224"}}, "timm_model_name"),
        ("biomedclipcxr_518.json", {"vision_cfg": {"timm_model_kwargs": {"embed_dim": 32, "depth": 3, "num_heads": 2,
                                                                         "patch_size": 16}}}, "patch size"),
    ],
)  # fmt: skip
def test_contradicted_fact_is_refused(tiny, tmp_path, file, changes, fact):
    m, b = _copy(tiny, tmp_path)
    _edit_json(m / file, **changes)
    with pytest.raises(LLaVARadLoadError, match=fact) as err:
        _load(m, b)
    assert file in str(err.value)


def test_weight_of_the_wrong_shape_is_refused_naming_both_shapes(tiny, tmp_path):
    """A trunk or projector weight present under its key but of another shape: the file, the
    key and both shapes are named (medvlm.core.llava_rad_loading.state_mismatch)."""
    m, b = _copy(tiny, tmp_path)
    ck = torch.load(m / "biomedclipcxr_518_checkpoint.pt", weights_only=True)
    key = "module.visual.trunk.blocks.1.attn.qkv.weight"
    shape = tuple(ck["state_dict"][key].shape)
    ck["state_dict"][key] = ck["state_dict"][key][:-1]
    torch.save(ck, m / "biomedclipcxr_518_checkpoint.pt")
    bad = (shape[0] - 1, *shape[1:])
    with pytest.raises(LLaVARadLoadError, match=re.escape(f"('blocks.1.attn.qkv.weight', {bad}, {shape})")) as err:
        _load(m, b)
    assert "checkpoint.pt" in str(err.value) and "shape mismatch" in str(err.value)
    m, b = _copy(tiny, tmp_path / "second")
    sd = torch.load(m / "non_lora_trainables.bin", weights_only=True)
    key = "base_model.model.model.mm_projector.2.weight"
    shape = tuple(sd[key].shape)
    sd[key] = sd[key][:, :-1]
    torch.save(sd, m / "non_lora_trainables.bin")
    bad = (shape[0], shape[1] - 1)
    message = f"model.mm_projector.2.weight: shape {bad}, expected {shape}"
    with pytest.raises(LLaVARadLoadError, match=re.escape(message)):
        _load(m, b)


def test_weight_file_that_does_not_fit_is_refused(tiny, tmp_path):
    m, b = _copy(tiny, tmp_path)
    ck = torch.load(m / "biomedclipcxr_518_checkpoint.pt", weights_only=True)
    del ck["state_dict"]["module.visual.trunk.blocks.1.attn.qkv.weight"]
    torch.save(ck, m / "biomedclipcxr_518_checkpoint.pt")
    with pytest.raises(LLaVARadLoadError, match="checkpoint.pt.*missing.*blocks.1.attn.qkv.weight"):
        _load(m, b)
    m, b = _copy(tiny, tmp_path / "second")
    sd = torch.load(m / "non_lora_trainables.bin", weights_only=True)
    del sd["base_model.model.model.mm_projector.2.bias"]
    torch.save(sd, m / "non_lora_trainables.bin")
    with pytest.raises(LLaVARadLoadError, match="non_lora_trainables.bin.*mm_projector.2.bias"):
        _load(m, b)


def test_hub_failure_says_what_to_do(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(LLaVARadLoadError, match="microsoft/llava-rad.*huggingface-cli download"):
        LLaVARadMedical().load_model(device="cpu")


def test_quantization_flags_are_checked_before_anything_loads(monkeypatch):
    with pytest.raises(ValueError, match="choose one of load_8bit and load_4bit"):
        LLaVARadMedical().load_model(load_8bit=True, load_4bit=True, device="cpu")
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        LLaVARadMedical().load_model(load_4bit=True, device="cpu")


# -- prompt, tokens, preprocessing, geometry -------------------------------------------------
def test_tokenisation_matches_the_official_slow_path(tiny, backend):
    """tokenizer_image_token with the slow (sentencepiece) tokenizer the official code uses."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(tiny[1]) / "tokenizer.model"))
    q = QUESTIONS[1]
    toks = backend.tokenize(q)
    full_q = f"{q} Answer yes or no."
    assert toks.prompt == f"{lr.SYSTEM_PROMPT} USER: <image>\n{full_q} ASSISTANT:"
    first, second = toks.prompt.split("<image>")
    expected = [sp.bos_id(), *sp.encode(first), lr.IMAGE_TOKEN_INDEX, *sp.encode(second)]
    assert toks.input_ids() == expected
    assert sp.id_to_piece(toks.suffix_ids[0]) == "▁" and sp.id_to_piece(toks.suffix_ids[1]) == "<0x0A>"
    assert backend.describe()["image_span"] == [len(sp.encode(first)) + 1, len(sp.encode(first)) + 1 + 1369]


@pytest.mark.parametrize("size", [(300, 200), (181, 397), (518, 518), (1000, 999), (90, 60)])
def test_preprocessing_equals_torchvision(backend, size):
    from torchvision import transforms as T

    rng = np.random.default_rng(size[0])
    img = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
    tv = T.Compose(
        [
            T.Resize(518, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(518),
            T.ToTensor(),
            T.Normalize(lr.CLIP_MEAN, lr.CLIP_STD),
        ]
    )
    ours = backend.preprocess(img)
    assert ours.shape == (3, 518, 518) and ours.dtype == torch.float32
    assert max_diff(ours, tv(img)) <= 1e-6
    gray = img.convert("L")
    assert max_diff(backend.preprocess(gray), tv(gray.convert("RGB"))) <= 1e-6


def test_geometry_maps_cells_to_what_the_model_saw(backend):
    w, h = 600, 400
    geo = backend.geometry(w, h)
    assert geo == shortest_side_center_crop_geometry(w, h, 518, (37, 37))
    assert backend.grid == (37, 37) and geo.n_tokens == 1369
    # a bright block around the centre of cell (10, 25) lands in that patch of the model input
    x0, y0, x1, y1 = geo.cell_box(10, 25)
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[int(y0) + 2 : int(y1) - 1, int(x0) + 2 : int(x1) - 1] = 255
    x = backend.preprocess(Image.fromarray(arr)).mean(0)  # [518, 518]
    patches = x.reshape(37, 14, 37, 14).mean((1, 3))
    assert divmod(int(patches.argmax()), 37) == (10, 25)
    # a block in the cropped-away margin never reaches the model
    assert geo.point_to_cell(5, 200) is None
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[150:250, 0:20] = 255
    x = backend.preprocess(Image.fromarray(arr))
    assert max_diff(x, backend.preprocess(Image.fromarray(np.zeros_like(arr)))) == 0.0


def test_sixteen_bit_image_is_refused_by_the_bare_transform(backend):
    """preprocess_image (open_clip's transform) would clip a 16-bit image: it refuses, naming the
    converter; the backend's preprocess converts first (tests/test_backend_inputs.py)."""
    with pytest.raises(ValueError, match="not 8-bit: make it 8-bit RGB first with medvlm.data.images.as_rgb8"):
        lr.preprocess_image(Image.fromarray(np.zeros((20, 30), dtype=np.uint16)), 518, lr.CLIP_MEAN, lr.CLIP_STD)


# -- scores --------------------------------------------------------------------------------------
def test_p_yes_from_yes_no_ids_and_shapes(tiny, backend, rgb_image):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(tiny[1]) / "tokenizer.model"))
    yes = {sp.piece_to_id(p) for p in ("▁yes", "▁Yes")}
    no = {sp.piece_to_id(p) for p in ("▁no", "▁No")}
    assert yes <= set(backend.answer_tokens.yes_ids) and no <= set(backend.answer_tokens.no_ids)
    scores = backend.score(rgb_image, QUESTIONS)
    for s in scores:
        prob = torch.softmax(s.extra["logits"].double(), -1)
        py = prob[list(backend.answer_tokens.yes_ids)].sum()
        pn = prob[list(backend.answer_tokens.no_ids)].sum()
        assert abs(s.p_yes - float(py / (py + pn))) <= 1e-9
        assert abs(s.coverage - float(py + pn)) <= 1e-9
        assert 0.0 <= s.p_yes <= 1.0 and s.answer == ("yes" if s.p_yes >= 0.5 else "no")
        assert s.attention.shape == (3, 1369) and s.attention.dtype == np.float32
        assert s.image_mass.shape == (3,) and np.all((s.image_mass > 0) & (s.image_mass <= 1))
        assert np.all(s.attention.sum(-1) <= s.image_mass + 1e-6)
        assert "<image>" in s.prompt and s.prompt.endswith("Answer yes or no. ASSISTANT:")
        assert s.generated_text is None and s.generated_answer is None
    assert len({round(s.p_yes, 6) for s in scores}) == len(scores), "P(yes) does not depend on the question"
    none = _backend(tiny, attention_head_mode="none").score(rgb_image, QUESTIONS[:1])[0]
    assert none.attention.shape == (3, 4, 1369)
    assert max_diff(none.attention.mean(1), scores[0].attention) <= TOL


def test_generation_is_batched_greedy(tiny, rgb_image):
    b = _backend(tiny, generate=True, max_new_tokens=4)
    batch = b.score(rgb_image, QUESTIONS)
    for s in batch:
        assert s.extra["generated_ids"][0] == int(s.extra["logits"].argmax())
        assert s.generated_answer in ("yes", "no", None)
    # question 0 is left-padded in the batch: alone it must give the same tokens
    single = b.score(rgb_image, QUESTIONS[:1])[0]
    assert batch[0].extra["generated_ids"] == single.extra["generated_ids"]
    # ... and a plain loop gives them too: the whole spliced sequence, no cache, argmax
    toks = b.tokenize(QUESTIONS[0])
    emb = b.model.get_input_embeddings()
    img = b.image_embeddings(b.preprocess(rgb_image)[None])[0]
    after, plain = list(toks.suffix_ids), []
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([emb(torch.tensor(toks.prefix_ids)), img, emb(torch.tensor(after))])[None]
            nxt = int(b.model(inputs_embeds=seq).logits[0, -1].argmax())
            if nxt == b.tokenizer.eos_token_id:
                break
            plain.append(nxt)
            after.append(nxt)
    assert len(plain) > 1
    assert batch[0].extra["generated_ids"] == plain
    assert batch[0].generated_text == b.tokenizer.decode(plain, skip_special_tokens=True).strip()


def test_describe_and_unload(tiny, rgb_image):
    b = LLaVARadMedical(MedicalAttentionConfig(layers="last_half")).load_model(*tiny, device="cpu")
    d = b.describe()
    assert d["random_weights"] is True
    assert d["name"] == "llava_rad" and d["dtype"] == "float32" and d["grid"] == [37, 37]
    assert d["attention_implementation"] == "sdpa + medvlm_rows capture"
    assert d["layers"] == [2] and d["head_mode"] == "mean" and d["query_mode"] == "answer"
    assert "{question}" in d["prompt_template"] and "<image>" in d["prompt_template"]
    assert d["lora"]["scale"] == 2.0
    b.unload()
    assert b.model is None
    with pytest.raises(RuntimeError, match="load_model"):
        b.score(rgb_image, QUESTIONS)


def test_tiny_is_the_tiny_checkpoint_loaded_and_its_folder_removed(tiny, backend, rgb_image, monkeypatch):
    """LLaVARadMedical.tiny(), as MedGemmaMedical.tiny(): the checkpoint write_tiny_llava_rad
    writes, loaded by load_model from a temporary folder that is gone afterwards; the manifest
    says random weights and names no folder."""
    import medvlm.core.tiny_llava_rad as tiny_module

    folders, write = [], tiny_module.write_tiny_llava_rad

    def recording_write(folder, seed):
        folders.append(folder)
        return write(folder, seed)

    monkeypatch.setattr(tiny_module, "write_tiny_llava_rad", recording_write)
    small = LLaVARadMedical.tiny(MedicalAttentionConfig(colormap="hot", attention_head_mode="mean"))
    assert len(folders) == 1 and not Path(folders[0]).exists()
    d = small.describe()
    assert d["random_weights"] is True and d["model_id"] == "tiny-random-llava-rad"
    assert d["model_dir"] is None and d["base_dir"] is None and d["revision"] is None
    assert d["device"] == "cpu" and d["dtype"] == "float32" and small.grid == (37, 37)
    got, want = small.score(rgb_image, QUESTIONS), backend.score(rgb_image, QUESTIONS)  # the tiny fixture, seed 0
    assert [s.p_yes for s in got] == [s.p_yes for s in want]
    assert all(np.array_equal(a.attention, b.attention) for a, b in zip(got, want, strict=True))
    other = LLaVARadMedical.tiny(seed=1).score(rgb_image, QUESTIONS[:1])[0]
    assert other.p_yes != want[0].p_yes


def test_tiny_checkpoint_is_deterministic(tmp_path, tiny):
    a = write_tiny_llava_rad(tmp_path / "a", seed=0)
    c = write_tiny_llava_rad(tmp_path / "c", seed=1)
    for name in ("non_lora_trainables.bin", "adapter_model.bin"):
        x = torch.load(Path(a[0]) / name, weights_only=True)
        y = torch.load(Path(tiny[0]) / name, weights_only=True)
        z = torch.load(Path(c[0]) / name, weights_only=True)
        assert all(torch.equal(x[k], y[k]) for k in x)
        assert not all(torch.equal(x[k], z[k]) for k in x)
    assert (Path(a[1]) / "model.safetensors").read_bytes() == (Path(tiny[1]) / "model.safetensors").read_bytes()
    assert (Path(a[1]) / "tokenizer.model").read_bytes() == (Path(tiny[1]) / "tokenizer.model").read_bytes()


def test_several_studies_in_one_pass_equal_the_reference(tiny, rgb_image):
    """score_many: two images in one packed pass (a batch row each, the second study's prefix
    followed by its own questions), each question reading its own study's prefix; equal to
    the eager full-prompt reference per question."""
    b = LLaVARadMedical(_backend(tiny, attention_head_mode="none").config).load_model(*tiny, device="cpu")
    b.keep_logits = True
    other = rgb_image.transpose(0).resize((180, 260))
    items = [(rgb_image, QUESTIONS[:2], None), (other, QUESTIONS[1:], None)]
    many = b.score_many(items)
    assert [len(m) for m in many] == [2, 2]
    for (image, questions, _), scores in zip(items, many, strict=True):
        for q, s in zip(questions, scores, strict=True):
            ref = llava_rad_reference_score(b, image, q)
            d = max_diff(s.extra["logits"], ref["logits"])
            assert d <= TOL, f"{q!r}: logits differ from the reference by {d:.3g}"
            maps, _ = _ref_maps(ref, [s.extra["prefix_len"] + p for p in s.extra["query_positions"]], "none")
            d = max_diff(s.attention, maps)
            assert d <= TOL, f"{q!r}: rows differ from the reference by {d:.3g}"
    assert max_diff(many[0][1].attention, many[1][0].attention) > 1e-4  # a prefix-row mix-up would show


@pytest.mark.parametrize("flag", ["load_8bit", "load_4bit"])
def test_quantized_loading_merges_first_and_stays_exact(tiny, rgb_image, flag):
    """8-/4-bit: LoRA merged in float, then the decoder's Linear layers quantized with
    bitsandbytes; the fast path still equals the eager reference on the quantized model."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    cfg = MedicalAttentionConfig(attention_head_mode="none")
    b = LLaVARadMedical(cfg).load_model(*tiny, device="cpu", **{flag: True})
    b.keep_logits = True
    kind = bnb.nn.Linear8bitLt if flag == "load_8bit" else bnb.nn.Linear4bit
    quantized = [m for m in b.model.model.modules() if isinstance(m, kind)]
    assert len(quantized) == 7 * b.n_layers, f"expected {7 * b.n_layers} quantized layers, found {len(quantized)}"
    assert not isinstance(b.model.lm_head, kind)
    assert b.describe()["quantization"] == flag[5:]
    s = b.score(rgb_image, QUESTIONS[:1])[0]
    ref = llava_rad_reference_score(b, rgb_image, QUESTIONS[0])
    assert max_diff(s.extra["logits"], ref["logits"]) <= 1e-4
    maps, _ = _ref_maps(ref, [s.extra["prefix_len"] + p for p in s.extra["query_positions"]], "none")
    d = max_diff(s.attention, maps)
    assert d <= TOL, f"quantized fast path differs from eager on the same weights by {d:.3g}"
    full = _backend(tiny).score(rgb_image, QUESTIONS[:1])[0]
    assert abs(s.p_yes - full.p_yes) < 0.1, "quantization moved P(yes) implausibly far"
    with pytest.raises(ValueError, match="not supported with 8-/4-bit"):
        b.compile()


def test_compiled_regions_equal_the_eager_reference(tiny, rgb_image):
    """compile(): each decoder layer's MLP and norms compiled (inductor on the CPU here); the
    fast path equals the eager full-prompt reference run on an uncompiled load of the same files."""
    b = LLaVARadMedical(MedicalAttentionConfig(attention_head_mode="none")).load_model(*tiny, device="cpu")
    assert b.compile() == 3 * b.n_layers and b.describe()["compiled"]
    b.keep_logits = True
    graphs = counters["stats"]["unique_graphs"]
    scores = b.score(rgb_image, QUESTIONS[:2])
    assert counters["stats"]["unique_graphs"] > graphs, "nothing was compiled"
    for q, s in zip(QUESTIONS[:2], scores, strict=True):
        ref = _reference(tiny, rgb_image, q)
        d = max_diff(s.extra["logits"], ref["logits"])
        assert d <= 1e-4, f"{q!r}: logits differ by {d:.3g}"
        maps, _ = _ref_maps(ref, [s.extra["prefix_len"] + p for p in s.extra["query_positions"]], "none")
        d = max_diff(s.attention, maps)
        assert d <= TOL, f"{q!r}: rows differ by {d:.3g}"


def test_the_cached_tiny_checkpoint_is_written_once_and_equals_a_fresh_one(tmp_path):
    """--tiny_random_models / --demo take the tiny checkpoint from the tool's cache: the same
    files a fresh write_tiny_llava_rad makes, written once, found again by the next call."""
    from medvlm.core.tiny_llava_rad import cache_root, cached_tiny_llava_rad, write_tiny_llava_rad

    first = cached_tiny_llava_rad()
    marker = Path(first[0]).parent / "COMPLETE"
    stamp = marker.stat().st_mtime_ns
    assert cached_tiny_llava_rad() == first and marker.stat().st_mtime_ns == stamp, "written a second time"
    assert Path(first[0]).is_relative_to(cache_root())
    fresh = write_tiny_llava_rad(tmp_path / "fresh")
    for cached_dir, fresh_dir in zip(first, fresh, strict=True):
        names = sorted(p.name for p in Path(fresh_dir).iterdir())
        assert sorted(p.name for p in Path(cached_dir).iterdir()) == names
        for name in names:
            if name.endswith(".json"):
                continue  # may name their own folder
            assert (Path(cached_dir) / name).read_bytes() == (Path(fresh_dir) / name).read_bytes(), name
