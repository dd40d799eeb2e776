"""Loading the official LLaVA-Rad checkpoint's files: the folder / hub resolution, safe tensor
and JSON reading, the peft LoRA merge, the projector from non_lora_trainables.bin and the
8-/4-bit quantization of the merged decoder.

Used by llava_rad_medical_only.LLaVARadMedical.load_model (which re-exports these names);
every failure raises LLaVARadLoadError naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

# -- checkpoint layout ------------------------------------------------------------------------
VISION_CONFIG_NAME = "biomedclipcxr_518.json"  # the name the official loader fetches from the hub
VISION_CHECKPOINT_NAME = "biomedclipcxr_518_checkpoint.pt"
NON_LORA_NAME = "non_lora_trainables.bin"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"
_HUB_PATTERNS_MODEL = ["*.json", "*.bin", "*.safetensors", "*.pt"]
_HUB_PATTERNS_BASE_META = ["*.json", "*.model"]


class LLaVARadLoadError(ValueError):
    """A checkpoint file is missing, unreadable, or contradicts a fact the code relies on."""


# -- file helpers -------------------------------------------------------------------------------
def _fail(path, message: str):
    raise LLaVARadLoadError(f"{path}: {message}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        _fail(path, "file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        _fail(path, f"not readable JSON ({type(e).__name__}: {e})")


def _load_tensors(path: Path) -> dict:
    """torch.load(weights_only=True) or safetensors; refuses anything else."""
    if not path.is_file():
        _fail(path, "file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported with the file name
        _fail(path, f"could not be loaded safely (torch.load weights_only=True): {type(e).__name__}: {e}")
    if not isinstance(obj, dict):
        _fail(path, f"expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _is_random(folder: Path) -> bool:
    return (folder / RANDOM_WEIGHTS_MARKER).exists()


def _revision_of(folder: Path) -> str | None:
    """The commit hash of a hub snapshot folder (.../snapshots/<sha>), else None."""
    name = folder.name
    return name if re.fullmatch(r"[0-9a-f]{40}", name) and folder.parent.name == "snapshots" else None


def _hub_download(repo_id: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - network, auth, offline: all end in the same advice
        raise LLaVARadLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            f"Without network access, download it once elsewhere (`huggingface-cli download {repo_id} "
            f"--local-dir DIR`), copy DIR here and pass the folder as model_path / model_base."
        ) from e


def resolve_folder(path_or_id: str, *, base: bool) -> Path:
    """A local folder as is; a hub id via snapshot_download (the base only fetches one weight
    format: safetensors when the repo has them, else the .bin shards)."""
    p = Path(os.path.expanduser(str(path_or_id)))
    if p.is_dir():
        return p.resolve()
    if p.exists():
        _fail(p, "expected a folder")
    if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        _fail(p, "folder not found (and not a hub id of the form owner/name)")
    if not base:
        return _hub_download(str(path_or_id), _HUB_PATTERNS_MODEL)
    folder = _hub_download(str(path_or_id), _HUB_PATTERNS_BASE_META)
    if (folder / "model.safetensors.index.json").exists() or (folder / "model.safetensors").exists():
        weights = ["*.safetensors"]
    elif (folder / "pytorch_model.bin.index.json").exists():
        weights = ["*.bin"]
    else:
        weights = ["model.safetensors", "pytorch_model.bin"]
    return _hub_download(str(path_or_id), _HUB_PATTERNS_BASE_META + weights)


def _find_file(folder: Path, configured: str | None, default_name: str, what: str) -> Path:
    """The official loader uses the configured path when it exists, else fetches the file by
    name from the model repo; here: configured path, its base name in the model folder, or
    the default name in the model folder."""
    candidates = []
    if configured:
        candidates += [Path(configured), folder / Path(configured).name]
    candidates.append(folder / default_name)
    for c in candidates:
        if c.is_file():
            return c
    _fail(folder / default_name, f"{what} not found (looked for {', '.join(str(c) for c in candidates)})")


# -- quantization --------------------------------------------------------------------------------
def _require_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("8-/4-bit loading needs bitsandbytes: pip install bitsandbytes") from e


def quantize_linear_layers(module: torch.nn.Module, mode: str, compute_dtype: torch.dtype) -> dict:
    """Replace every nn.Linear under `module` (the decoder layers; lm_head stays float, as
    transformers' bitsandbytes integration keeps it) by a bitsandbytes layer holding the same,
    already LoRA-merged weights: LLM.int8 (threshold 6.0) for "8bit", NF4 with
    `compute_dtype` for "4bit". The weights are quantized when the module moves to the GPU.
    Returns {"mode", "n_layers", "compute_dtype"}. The attention rows the capture reads are
    computed from this quantized model's own queries and keys."""
    import bitsandbytes as bnb

    if mode not in ("8bit", "4bit"):
        raise ValueError(f"unknown quantization {mode!r}; valid: 8bit, 4bit")
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, lin in targets:
        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        w = lin.weight.data.to(torch.float16 if mode == "8bit" else compute_dtype)
        if mode == "8bit":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)  # fmt: skip
            q.weight = bnb.nn.Int8Params(w.contiguous(), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4")  # fmt: skip
            q.weight = bnb.nn.Params4bit(w.contiguous(), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[-1], q)
    return {"mode": mode, "n_layers": len(targets), "compute_dtype": str(compute_dtype).replace("torch.", "")}


# -- LoRA ----------------------------------------------------------------------------------------
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def _targets(module_name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in target_modules)


@torch.no_grad()
def merge_lora(model: torch.nn.Module, adapter_dir: Path) -> dict:
    """Merge a peft LoRA adapter into the model's Linear weights: W <- W + (alpha / r) B A
    (alpha / sqrt(r) with use_rslora), computed in float32 then cast to W's dtype.

    Refuses (LLaVARadLoadError naming the file) adapter features this merge does not
    implement, keys that match no Linear, modules with A but not B, shapes that disagree, and
    target modules without weights."""
    cfg_path = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    acfg = _read_json(cfg_path)
    if acfg.get("peft_type", "LORA") != "LORA":
        _fail(cfg_path, f"peft_type {acfg.get('peft_type')!r}, expected 'LORA'")
    unsupported = {
        "use_dora": bool(acfg.get("use_dora", False)),
        "fan_in_fan_out": bool(acfg.get("fan_in_fan_out", False)),
        "bias != none": acfg.get("bias", "none") != "none",
        "lora_bias": bool(acfg.get("lora_bias", False)),
        "rank_pattern": bool(acfg.get("rank_pattern")),
        "alpha_pattern": bool(acfg.get("alpha_pattern")),
        "modules_to_save": bool(acfg.get("modules_to_save")),
        "layer_replication": bool(acfg.get("layer_replication")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        _fail(cfg_path, f"LoRA features not supported by the merge: {bad}")
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if acfg.get("use_rslora", False) else alpha / r
    weight_path = next((Path(adapter_dir) / n for n in ADAPTER_WEIGHT_NAMES if (Path(adapter_dir) / n).is_file()), None)
    if weight_path is None:
        _fail(
            Path(adapter_dir) / ADAPTER_WEIGHT_NAMES[1],
            f"adapter weights not found ({' or '.join(ADAPTER_WEIGHT_NAMES)})",
        )
    sd = _load_tensors(weight_path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in sd.items():
        m = _LORA_KEY.match(k)
        if not m:
            unknown.append(k)
            continue
        pairs.setdefault(m["module"], {})[m["ab"]] = v
    if unknown:
        _fail(weight_path, f"keys that are not LoRA A/B weights: {unknown[:5]} ({len(unknown)})")
    modules = dict(model.named_modules())
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            _fail(weight_path, f"{name}: lora_{'B' if 'A' in ab else 'A'} missing")
        mod = modules.get(name)
        if not isinstance(mod, torch.nn.Linear):
            _fail(weight_path, f"{name}: no Linear layer of that name in the language model")
        a, b = ab["A"], ab["B"]
        if a.shape != (r, mod.in_features) or b.shape != (mod.out_features, r):
            _fail(weight_path, f"{name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                               f"r={r} and Linear({mod.in_features}, {mod.out_features})")  # fmt: skip
    layers_to_transform = acfg.get("layers_to_transform")
    expected = set()
    for name, mod in modules.items():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head" and _targets(name, acfg.get("target_modules") or []):
            m = re.search(r"\.layers\.(\d+)\.", name)
            if layers_to_transform is not None and m is not None:
                allowed = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
                if int(m.group(1)) not in allowed:
                    continue
            expected.add(name)
    missing = sorted(expected - set(pairs))
    if missing:
        _fail(weight_path, f"target modules without LoRA weights: {missing[:5]} ({len(missing)})")
    for name, ab in pairs.items():
        w = modules[name].weight
        delta = (ab["B"].to(w.device, torch.float32) @ ab["A"].to(w.device, torch.float32)) * scale
        w.copy_((w.float() + delta).to(w.dtype))
    return {
        "file": str(weight_path),
        "r": r,
        "lora_alpha": alpha,
        "scale": scale,
        "use_rslora": bool(acfg.get("use_rslora", False)),
        "merged_modules": len(pairs),
        "target_modules": sorted(acfg.get("target_modules") or [])
        if not isinstance(acfg.get("target_modules"), str)
        else acfg["target_modules"],
    }


def state_mismatch(expected: dict, got: dict) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """How a file's weights `got` fail a module's state dict `expected`: (missing keys, sorted;
    unexpected keys, sorted; (key, file shape, module shape) of the shared keys whose shapes
    differ, in the file's order)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in got.items()
           if k in expected and tuple(v.shape) != tuple(expected[k].shape)]  # fmt: skip
    return missing, unexpected, bad


# -- the projector and any other non-LoRA weights -------------------------------------------
def load_non_lora(path: Path, projector: torch.nn.Sequential, lm) -> dict:
    """non_lora_trainables.bin: keys normalised as the official builder does
    ("base_model." stripped, then "model." if keys start with "model.model."), loaded with
    strict=False into LlavaLlamaForCausalLM. Here: the projector (all keys required), any
    Llama weight (applied, reported), vision-tower keys (ignored, as the official code does
    while its tower is not yet built); anything else is refused."""
    raw = _load_tensors(path)
    sd = {(k[11:] if k.startswith("base_model.") else k): v for k, v in raw.items()}
    if any(k.startswith("model.model.") for k in sd):
        sd = {(k[6:] if k.startswith("model.") else k): v for k, v in sd.items()}
    proj_sd = {k[len("model.mm_projector.") :]: v for k, v in sd.items() if k.startswith("model.mm_projector.")}
    missing, extra, bad = state_mismatch(projector.state_dict(), proj_sd)
    if missing or extra:
        _fail(path, f"projector keys: missing {['model.mm_projector.' + k for k in missing]}, "
                    f"unexpected {['model.mm_projector.' + k for k in extra]}")  # fmt: skip
    if bad:
        k, found, want = bad[0]
        _fail(path, f"model.mm_projector.{k}: shape {found}, expected {want} (mm_hidden_size / hidden_size)")
    projector.load_state_dict({k: v.float() for k, v in proj_sd.items()}, strict=True)
    lm_sd = lm.state_dict()
    applied, ignored, unknown = [], [], []
    for k, v in sd.items():
        if k.startswith("model.mm_projector."):
            continue
        if k in lm_sd and tuple(lm_sd[k].shape) == tuple(v.shape):
            applied.append(k)
        elif k.startswith("model.vision_tower."):
            ignored.append(k)
        else:
            unknown.append(k)
    if unknown:
        _fail(path, f"unexpected keys (neither projector nor language model): {unknown[:5]} ({len(unknown)})")
    if applied:
        with torch.no_grad():
            params = dict(lm.named_parameters())
            for k in applied:
                params[k].copy_(sd[k].to(params[k].device, params[k].dtype))
    return {"projector_keys": sorted(proj_sd), "applied_lm_keys": applied, "ignored_vision_keys": len(ignored)}
